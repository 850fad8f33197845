/* linebuf.c: line splitting and tail capture for process output. */
#include "linebuf.h"

#include <stdlib.h>
#include <string.h>

void ops_linebuf_init(ops_linebuf *lb, size_t max_line) {
  memset(lb, 0, sizeof *lb);
  lb->max_line = max_line ? max_line : 1;
}

static int emit(ops_linebuf *lb, const char *line, size_t len, ops_line_fn fn, void *ctx) {
  (void)lb;
  if (len > 0 && line[len - 1] == '\r') len--;
  return fn(ctx, line, len);
}

static int carry(ops_linebuf *lb, const char *data, size_t n) {
  if (lb->len + n > lb->cap) {
    size_t cap = lb->cap ? lb->cap : 256;
    while (cap < lb->len + n) cap *= 2;
    char *b = realloc(lb->buf, cap);
    if (b == NULL) return -1;
    lb->buf = b;
    lb->cap = cap;
  }
  memcpy(lb->buf + lb->len, data, n);
  lb->len += n;
  return 0;
}

int ops_linebuf_feed(ops_linebuf *lb, const char *data, size_t n, ops_line_fn fn, void *ctx) {
  while (n > 0) {
    const char *nl = memchr(data, '\n', n);
    size_t seg = nl ? (size_t)(nl - data) : n;
    if (lb->len + seg > lb->max_line) {
      /* too long: hand over max_line bytes and go on with the rest of it */
      size_t take = lb->max_line - lb->len;
      int rc;
      if (lb->len == 0) {
        rc = fn(ctx, data, take);
      } else {
        if (carry(lb, data, take) != 0) return -1;
        rc = fn(ctx, lb->buf, lb->len);
        lb->len = 0;
      }
      if (rc) return rc;
      data += take;
      n -= take;
      continue;
    }
    if (!nl) return carry(lb, data, n);
    int rc;
    if (lb->len == 0) {
      rc = emit(lb, data, seg, fn, ctx);
    } else {
      if (carry(lb, data, seg) != 0) return -1;
      size_t total = lb->len;
      lb->len = 0; /* reset first: fn may not return */
      rc = emit(lb, lb->buf, total, fn, ctx);
    }
    if (rc) return rc;
    data += seg + 1;
    n -= seg + 1;
  }
  return 0;
}

int ops_linebuf_finish(ops_linebuf *lb, ops_line_fn fn, void *ctx) {
  if (lb->len == 0) return 0;
  size_t len = lb->len;
  lb->len = 0;
  return emit(lb, lb->buf, len, fn, ctx);
}

void ops_linebuf_free(ops_linebuf *lb) {
  free(lb->buf);
  memset(lb, 0, sizeof *lb);
}

void ops_tailbuf_init(ops_tailbuf *t, size_t limit) {
  memset(t, 0, sizeof *t);
  t->limit = limit;
}

int ops_tailbuf_append(ops_tailbuf *t, const char *data, size_t n) {
  if (t->limit == 0) {
    t->truncated |= n > 0;
    return 0;
  }
  if (n >= t->limit) {
    t->truncated |= n > t->limit || t->len > 0;
    data += n - t->limit;
    n = t->limit;
    t->len = 0;
  }
  size_t max = 2 * t->limit; /* room to append before sliding back to `limit` bytes */
  if (t->len + n > max) {
    size_t keep = t->limit - n;
    memmove(t->buf, t->buf + t->len - keep, keep);
    t->len = keep;
    t->truncated = 1;
  }
  if (t->len + n > t->cap) {
    size_t cap = t->cap ? t->cap : 1024;
    while (cap < t->len + n) cap *= 2;
    if (cap > max) cap = max;
    char *b = realloc(t->buf, cap);
    if (b == NULL) return -1;
    t->buf = b;
    t->cap = cap;
  }
  memcpy(t->buf + t->len, data, n);
  t->len += n;
  return 0;
}

const char *ops_tailbuf_data(const ops_tailbuf *t, size_t *len) {
  if (t->len > t->limit) {
    *len = t->limit;
    return t->buf + t->len - t->limit;
  }
  *len = t->len;
  return t->buf ? t->buf : "";
}

void ops_tailbuf_free(ops_tailbuf *t) {
  free(t->buf);
  memset(t, 0, sizeof *t);
}
