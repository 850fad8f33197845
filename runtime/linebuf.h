/* linebuf.h: splitting a byte stream into lines, and keeping the bounded tail of it. */
#ifndef OPSRUN_LINEBUF_H
#define OPSRUN_LINEBUF_H

#include <stddef.h>

/* A line is handed over without its "\n" (and without a "\r" before it). A line longer
 * than max_line is handed over in pieces of max_line bytes. Returns 0 to go on. */
typedef int (*ops_line_fn)(void *ctx, const char *line, size_t len);

typedef struct {
  char *buf; /* the partial line carried between feeds */
  size_t len, cap, max_line;
} ops_linebuf;

void ops_linebuf_init(ops_linebuf *lb, size_t max_line);
/* Returns 0, the callback's non-zero value when it stopped, or -1 when out of memory. */
int ops_linebuf_feed(ops_linebuf *lb, const char *data, size_t n, ops_line_fn fn, void *ctx);
/* At end of stream: hands over a last line that had no "\n". */
int ops_linebuf_finish(ops_linebuf *lb, ops_line_fn fn, void *ctx);
void ops_linebuf_free(ops_linebuf *lb);

/* Keeps at most `limit` bytes: the most recent ones. */
typedef struct {
  char *buf;  /* a ring of cap bytes (cap <= limit) */
  size_t len, cap, limit;
  size_t start; /* where the oldest kept byte is */
  int truncated;
} ops_tailbuf;

void ops_tailbuf_init(ops_tailbuf *t, size_t limit);
/* Returns 0, or -1 when out of memory. */
int ops_tailbuf_append(ops_tailbuf *t, const char *data, size_t n);
/* Once the ring has grown to `limit`: where the next bytes go and how many fit there
 * (at most *n), so that a reader can fill it in place and then commit what it wrote,
 * instead of appending a copy. NULL while the ring is still growing. */
char *ops_tailbuf_space(ops_tailbuf *t, size_t *n);
void ops_tailbuf_commit(ops_tailbuf *t, size_t n);
/* The kept bytes (at most limit), oldest first, and their length; valid until the next append. */
const char *ops_tailbuf_data(ops_tailbuf *t, size_t *len);
void ops_tailbuf_free(ops_tailbuf *t);

#endif
