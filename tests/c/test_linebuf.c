/* Line splitting and tail capture for process output. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdlib.h>
#include <string.h>

#include "linebuf.h"

typedef struct {
  char lines[32][64];
  int n;
  int stop_after;
} got;

static int collect(void *ctx, const char *line, size_t len) {
  got *g = ctx;
  assert_true(g->n < 32);
  assert_true(len < 64);
  memcpy(g->lines[g->n], line, len);
  g->lines[g->n][len] = '\0';
  g->n++;
  return g->stop_after && g->n == g->stop_after ? 7 : 0;
}

static void splits_complete_lines_and_carries_the_rest(void **state) {
  (void)state;
  ops_linebuf lb;
  got g = {0};
  ops_linebuf_init(&lb, 1024);
  assert_int_equal(ops_linebuf_feed(&lb, "one\ntw", 6, collect, &g), 0);
  assert_int_equal(g.n, 1);
  assert_string_equal(g.lines[0], "one");
  assert_int_equal(ops_linebuf_feed(&lb, "o\n\nthree", 8, collect, &g), 0);
  assert_int_equal(g.n, 3);
  assert_string_equal(g.lines[1], "two");
  assert_string_equal(g.lines[2], "");
  assert_int_equal(ops_linebuf_finish(&lb, collect, &g), 0);
  assert_int_equal(g.n, 4);
  assert_string_equal(g.lines[3], "three");
  assert_int_equal(ops_linebuf_finish(&lb, collect, &g), 0); /* nothing left */
  assert_int_equal(g.n, 4);
  ops_linebuf_free(&lb);
}

static void drops_the_carriage_return_of_crlf(void **state) {
  (void)state;
  ops_linebuf lb;
  got g = {0};
  ops_linebuf_init(&lb, 1024);
  ops_linebuf_feed(&lb, "a\r\nb\r", 5, collect, &g);
  ops_linebuf_feed(&lb, "\n", 1, collect, &g);
  assert_int_equal(g.n, 2);
  assert_string_equal(g.lines[0], "a");
  assert_string_equal(g.lines[1], "b");
  ops_linebuf_free(&lb);
}

static void cuts_overlong_lines_into_pieces(void **state) {
  (void)state;
  ops_linebuf lb;
  got g = {0};
  ops_linebuf_init(&lb, 4);
  ops_linebuf_feed(&lb, "abcdefghij\nxy", 13, collect, &g);
  assert_int_equal(g.n, 3);
  assert_string_equal(g.lines[0], "abcd");
  assert_string_equal(g.lines[1], "efgh");
  assert_string_equal(g.lines[2], "ij");
  /* carried part plus new data over the limit */
  ops_linebuf_feed(&lb, "zwvu\n", 5, collect, &g);
  assert_int_equal(g.n, 5);
  assert_string_equal(g.lines[3], "xyzw");
  assert_string_equal(g.lines[4], "vu");
  /* exactly max_line then newline: one line, no empty piece */
  ops_linebuf_feed(&lb, "1234", 4, collect, &g);
  ops_linebuf_feed(&lb, "\n", 1, collect, &g);
  assert_int_equal(g.n, 6);
  assert_string_equal(g.lines[5], "1234");
  ops_linebuf_free(&lb);
}

static void stops_when_the_callback_says_so(void **state) {
  (void)state;
  ops_linebuf lb;
  got g = {0};
  g.stop_after = 2;
  ops_linebuf_init(&lb, 100);
  assert_int_equal(ops_linebuf_feed(&lb, "a\nb\nc\n", 6, collect, &g), 7);
  assert_int_equal(g.n, 2);
  ops_linebuf_free(&lb);
}

static void tail_keeps_everything_under_the_limit(void **state) {
  (void)state;
  ops_tailbuf t;
  size_t n;
  ops_tailbuf_init(&t, 10);
  ops_tailbuf_append(&t, "hello", 5);
  const char *d = ops_tailbuf_data(&t, &n);
  assert_int_equal(n, 5);
  assert_memory_equal(d, "hello", 5);
  assert_false(t.truncated);
  ops_tailbuf_free(&t);
}

static void tail_keeps_the_last_bytes_when_over(void **state) {
  (void)state;
  ops_tailbuf t;
  size_t n;
  ops_tailbuf_init(&t, 10);
  for (int i = 0; i < 100; i++) {
    char c = (char)('a' + i % 26);
    ops_tailbuf_append(&t, &c, 1);
  }
  const char *d = ops_tailbuf_data(&t, &n);
  assert_int_equal(n, 10);
  /* bytes 90..99 */
  for (int i = 0; i < 10; i++) assert_int_equal(d[i], 'a' + (90 + i) % 26);
  assert_true(t.truncated);
  assert_true(t.cap <= 20);
  /* one append bigger than the limit */
  char big[25];
  for (int i = 0; i < 25; i++) big[i] = (char)('A' + i);
  ops_tailbuf_append(&t, big, 25);
  d = ops_tailbuf_data(&t, &n);
  assert_int_equal(n, 10);
  assert_memory_equal(d, big + 15, 10);
  ops_tailbuf_free(&t);
}

static void tail_with_zero_limit_keeps_nothing(void **state) {
  (void)state;
  ops_tailbuf t;
  size_t n;
  ops_tailbuf_init(&t, 0);
  ops_tailbuf_append(&t, "abc", 3);
  ops_tailbuf_data(&t, &n);
  assert_int_equal(n, 0);
  assert_true(t.truncated);
  ops_tailbuf_free(&t);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(splits_complete_lines_and_carries_the_rest),
      cmocka_unit_test(drops_the_carriage_return_of_crlf),
      cmocka_unit_test(cuts_overlong_lines_into_pieces),
      cmocka_unit_test(stops_when_the_callback_says_so),
      cmocka_unit_test(tail_keeps_everything_under_the_limit),
      cmocka_unit_test(tail_keeps_the_last_bytes_when_over),
      cmocka_unit_test(tail_with_zero_limit_keeps_nothing),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
