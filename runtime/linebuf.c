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

static void commit(ops_tailbuf *t, size_t n) {
  if (t->len + n > t->cap) {
    t->start = (t->start + t->len + n - t->cap) % t->cap;
    t->len = t->cap;
    t->truncated = 1;
  } else {
    t->len += n;
  }
}

/* A ring: each byte is copied in once, however much passes through. It grows (unwrapped)
 * up to `limit` bytes and wraps only once it is full. */
int ops_tailbuf_append(ops_tailbuf *t, const char *data, size_t n) {
  if (n == 0) return 0;
  if (n >= t->limit) {
    t->truncated |= n > t->limit || t->len > 0;
    data += n - t->limit;
    n = t->limit;
    t->len = t->start = 0;
    if (n == 0) return 0;
  }
  if (t->len + n > t->cap && t->cap < t->limit) {
    size_t cap = t->cap ? t->cap : 1024;
    while (cap < t->len + n) cap *= 2;
    if (cap > t->limit) cap = t->limit;
    char *b = realloc(t->buf, cap); /* start is 0 until the ring is full */
    if (b == NULL) return -1;
    t->buf = b;
    t->cap = cap;
  }
  size_t at = (t->start + t->len) % t->cap;
  size_t first = n < t->cap - at ? n : t->cap - at;
  memcpy(t->buf + at, data, first);
  memcpy(t->buf, data + first, n - first);
  commit(t, n);
  return 0;
}

char *ops_tailbuf_space(ops_tailbuf *t, size_t *n) {
  if (t->cap != t->limit || t->limit == 0) return NULL;
  size_t at = (t->start + t->len) % t->cap;
  if (*n > t->cap - at) *n = t->cap - at;
  return t->buf + at;
}

void ops_tailbuf_commit(ops_tailbuf *t, size_t n) { commit(t, n); }

static void reverse(char *p, size_t n) {
  for (size_t i = 0, j = n; i + 1 < j; i++, j--) {
    char c = p[i];
    p[i] = p[j - 1];
    p[j - 1] = c;
  }
}

const char *ops_tailbuf_data(ops_tailbuf *t, size_t *len) {
  if (t->start) { /* rotate the oldest byte to the front, in place */
    reverse(t->buf, t->start);
    reverse(t->buf + t->start, t->cap - t->start);
    reverse(t->buf, t->cap);
    t->start = 0;
  }
  *len = t->len;
  return t->buf ? t->buf : "";
}

void ops_tailbuf_free(ops_tailbuf *t) {
  free(t->buf);
  memset(t, 0, sizeof *t);
}
