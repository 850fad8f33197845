/* The signals a child of ops.proc resets (runtime/proc.c): every disposition this process
 * sets is noted, whichever library sets it (libuv, here), and signal() keeps glibc's
 * semantics. Under AddressSanitizer every signal is reset, and only that is checked. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <signal.h>
#include <string.h>

#include "opsrun.h"

/* as runtime/proc.c decides it: gcc's macro, or clang's feature */
#if defined(__SANITIZE_ADDRESS__)
#define ASAN_BUILD 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define ASAN_BUILD 1
#endif
#endif

static uint64_t bit(int sig) { return (uint64_t)1 << (sig - 1); }

static void on_signal(int sig) { (void)sig; }

static void notes_what_signal_and_sigaction_set(void **state) {
  (void)state;
  uint64_t before = ops_proc_signals_to_reset();
#if defined(ASAN_BUILD)
  assert_true(before == ~(uint64_t)0);
#else
  /* nothing has touched these in this test program */
  assert_false(before & bit(SIGUSR2));
  assert_false(before & bit(SIGWINCH));
  assert_false(before & bit(SIGURG));
#endif
  assert_true(signal(SIGUSR2, SIG_IGN) == SIG_DFL);
  struct sigaction act;
  memset(&act, 0, sizeof act);
  act.sa_handler = on_signal;
  sigemptyset(&act.sa_mask);
  assert_int_equal(sigaction(SIGWINCH, &act, NULL), 0);
  uint64_t after = ops_proc_signals_to_reset();
  assert_true(after & bit(SIGUSR2));
  assert_true(after & bit(SIGWINCH));
  /* set back to the default: still reset (a child resets what may not be the default) */
  assert_true(signal(SIGUSR2, SIG_DFL) == SIG_IGN);
  assert_true(ops_proc_signals_to_reset() & bit(SIGUSR2));
#if !defined(ASAN_BUILD)
  assert_false(after & bit(SIGURG));
#endif
}

static void signal_keeps_glibc_semantics(void **state) {
  (void)state;
  assert_true(signal(SIGUSR1, on_signal) == SIG_DFL);
  struct sigaction now;
  assert_int_equal(sigaction(SIGUSR1, NULL, &now), 0);
  assert_true(now.sa_handler == on_signal);
  assert_true(now.sa_flags & SA_RESTART);
  assert_true(sigismember(&now.sa_mask, SIGUSR1));
  assert_true(signal(SIGUSR1, SIG_DFL) == on_signal);
  assert_true(signal(0, SIG_IGN) == SIG_ERR);
  assert_true(signal(SIGKILL, SIG_IGN) == SIG_ERR);
}

static void on_uv_signal(uv_signal_t *h, int sig) {
  (void)h;
  (void)sig;
}

static void notes_a_handler_libuv_installs(void **state) {
  (void)state;
#if !defined(ASAN_BUILD)
  assert_false(ops_proc_signals_to_reset() & bit(SIGPROF));
#endif
  uv_loop_t loop;
  uv_signal_t h;
  assert_int_equal(uv_loop_init(&loop), 0);
  assert_int_equal(uv_signal_init(&loop, &h), 0);
  assert_int_equal(uv_signal_start(&h, on_uv_signal, SIGPROF), 0);
  assert_true(ops_proc_signals_to_reset() & bit(SIGPROF));
  uv_close((uv_handle_t *)&h, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(uv_loop_close(&loop), 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(notes_what_signal_and_sigaction_set),
      cmocka_unit_test(signal_keeps_glibc_semantics),
      cmocka_unit_test(notes_a_handler_libuv_installs),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
