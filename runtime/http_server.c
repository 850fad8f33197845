/* http_server.c: the HTTP/1.1 server (ops.http.serve) on libh2o's libuv build.
 *
 * h2o parses requests, reads bodies (with the body limit), keeps connections alive and
 * writes responses; each request goes to the Lua handler in a task of its own, and h2o
 * keeps the h2o_req_t until that task answers through core._respond.
 *
 * What h2o 2.2 cannot do we add around it: it has one request timer covering the idle
 * wait, the header and the body together, so a sweep timer watches each connection's
 * phase (idle, reading the header, reading the body, sending) and cuts the slow ones; its
 * header limit is a compile-time constant, so the configured one is checked once the
 * header is parsed (431).
 *
 * Ownership: the server struct and each connection live in malloc'd memory. A connection
 * goes in its libuv close callback; the server goes once its own handles are closed, every
 * connection is gone and no request token (a Lua userdata a handler task holds) points to
 * it any more.
 */
#include "opsrun.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-parameter"
#pragma GCC diagnostic ignored "-Wsign-compare"
#include <h2o.h>
#pragma GCC diagnostic pop

#define SERVER_MT "ops.http_server"
#define TOKEN_MT "ops.http_server.request"
#define DISPATCH_KEY "ops.http_server.dispatch"

#define DEFAULT_MAX_BODY (25 * 1024 * 1024)
#define DEFAULT_MAX_HEADER (64 * 1024)
#define DEFAULT_HEADER_TIMEOUT 10.0
#define DEFAULT_BODY_TIMEOUT 30.0
#define DEFAULT_IDLE_TIMEOUT 60.0
#define DEFAULT_MAX_CONNECTIONS 1024
#define DEFAULT_CLOSE_DEADLINE 30.0

/* ---- the request, as plain data (also what the fuzz target feeds) ---- */

typedef struct {
  const char *name, *value;
  size_t name_len, value_len;
} http_header;

typedef struct {
  const char *method, *target, *authority, *body, *remote;
  size_t method_len, target_len, authority_len, body_len;
  const http_header *headers; /* names in lower case */
  size_t nheaders;
  int has_body;
} http_request;

typedef struct {
  size_t max_body, max_header;
} http_limits;

/* The size the header section takes on the wire, give or take the line endings. */
static size_t request_header_bytes(const http_request *r) {
  size_t n = r->method_len + r->target_len + sizeof " HTTP/1.1\r\n";
  if (r->authority) n += r->authority_len + sizeof "host: \r\n";
  for (size_t i = 0; i < r->nheaders; i++) n += r->headers[i].name_len + r->headers[i].value_len + 4;
  return n;
}

/* 0 when the request is within the limits, else the status to answer with. */
static int request_check_limits(const http_request *r, const http_limits *lim) {
  if (request_header_bytes(r) > lim->max_header) return 431;
  if (r->has_body && r->body_len > lim->max_body) return 413;
  return 0;
}

static int hexval(int c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/* Pushes the percent-decoded path; a malformed escape stays as it was. */
static void push_decoded(lua_State *L, const char *s, size_t n) {
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  for (size_t i = 0; i < n; i++) {
    int hi, lo;
    if (s[i] == '%' && i + 2 < n && (hi = hexval((unsigned char)s[i + 1])) >= 0 &&
        (lo = hexval((unsigned char)s[i + 2])) >= 0) {
      luaL_addchar(&b, (char)(hi * 16 + lo));
      i += 2;
    } else {
      luaL_addchar(&b, s[i]);
    }
  }
  luaL_pushresult(&b);
}

/* Adds one header to the table at t: repeated names are joined with ", ". */
static void add_header(lua_State *L, int t, const char *name, size_t nlen, const char *value, size_t vlen) {
  lua_pushlstring(L, name, nlen);
  lua_pushvalue(L, -1);
  if (lua_rawget(L, t) == LUA_TSTRING) {
    lua_pushliteral(L, ", ");
    lua_pushlstring(L, value, vlen);
    lua_concat(L, 3);
  } else {
    lua_pop(L, 1);
    lua_pushlstring(L, value, vlen);
  }
  lua_rawset(L, t);
}

/* Pushes req = {method, path, raw_path, query, headers, body, remote}; raises only when
 * out of memory. */
static void push_request(lua_State *L, const http_request *r) {
  luaL_checkstack(L, 8, "http request");
  lua_createtable(L, 0, 7);
  lua_pushlstring(L, r->method, r->method_len);
  lua_setfield(L, -2, "method");
  const char *t = r->target, *end = r->target + r->target_len;
  /* absolute-form (http://host/path): the path starts after the authority */
  if (r->target_len > 0 && t[0] != '/' && t[0] != '*') {
    for (const char *p = t; p + 3 <= end; p++)
      if (p[0] == ':' && p[1] == '/' && p[2] == '/') {
        const char *slash = memchr(p + 3, '/', (size_t)(end - (p + 3)));
        t = slash ? slash : end;
        break;
      }
  }
  const char *q = memchr(t, '?', (size_t)(end - t));
  const char *path_end = q ? q : end;
  lua_pushlstring(L, t, (size_t)(path_end - t));
  if (memchr(t, '%', (size_t)(path_end - t)) == NULL)
    lua_pushvalue(L, -1); /* nothing to decode: the same string */
  else
    push_decoded(L, t, (size_t)(path_end - t));
  lua_setfield(L, -3, "path");
  lua_setfield(L, -2, "raw_path");
  if (q)
    lua_pushlstring(L, q + 1, (size_t)(end - q - 1));
  else
    lua_pushliteral(L, "");
  lua_setfield(L, -2, "query");
  lua_createtable(L, 0, (int)r->nheaders + 2);
  int h = lua_gettop(L);
  if (r->authority) add_header(L, h, "host", 4, r->authority, r->authority_len);
  for (size_t i = 0; i < r->nheaders; i++)
    add_header(L, h, r->headers[i].name, r->headers[i].name_len, r->headers[i].value, r->headers[i].value_len);
  if (r->has_body) { /* its digits, without a printf per request */
    char digits[24], *p = digits + sizeof digits;
    size_t n = r->body_len;
    do *--p = (char)('0' + n % 10); while ((n /= 10) > 0);
    lua_pushlstring(L, p, (size_t)(digits + sizeof digits - p));
    lua_setfield(L, h, "content-length");
  }
  lua_setfield(L, -2, "headers");
  if (r->has_body)
    lua_pushlstring(L, r->body, r->body_len);
  else
    lua_pushliteral(L, "");
  lua_setfield(L, -2, "body");
  lua_pushstring(L, r->remote ? r->remote : "");
  lua_setfield(L, -2, "remote");
}

/* Where the header section ends in buf (the offset of the first body byte), or 0 while
 * it is incomplete; scanning resumes at *scanned. */
static size_t scan_header_end(const char *buf, size_t len, size_t *scanned) {
  size_t i = *scanned > 3 ? *scanned - 3 : 0;
  for (; i < len; i++) {
    if (buf[i] != '\n') continue;
    if (i + 1 < len && buf[i + 1] == '\n') return i + 2;
    if (i + 2 < len && buf[i + 1] == '\r' && buf[i + 2] == '\n') return i + 3;
  }
  *scanned = len;
  return 0;
}

/* ---- the server ---- */

typedef struct server server;
typedef struct conn conn;
typedef struct token token;

enum { PH_IDLE, PH_HEADER, PH_BODY };
enum { S_OPEN, S_CLOSING, S_CLOSED };

struct conn {
  union {
    uv_tcp_t tcp;
    uv_pipe_t pipe;
  } h; /* first: the close callback gets &h */
  server *s;
  h2o_socket_t *sock; /* NULL once h2o has let it go */
  token *busy;        /* the request the handler has, until h2o is done with it */
  int phase, cut;
  uint64_t since; /* when the phase began (uv_now) */
  size_t scanned;
  char remote[64];
  conn *next, *prev;
};

/* A request handed to Lua: the handler task holds it, the request's pool points to it. */
struct token {
  server *s;
  h2o_req_t *req; /* NULL once h2o has disposed of the request */
  conn *c;
  int self_ref;  /* pinned while the request lives */
  int answered;  /* a response was sent (or the server answered for it) */
  int in_flight; /* counted in s->in_flight until the handler's task answers */
  uint64_t answered_at;
};

typedef struct closer {
  ops_wait w;
  server *s;
  struct closer *next;
} closer;

typedef struct {
  h2o_handler_t super;
  server *s;
} route;

typedef struct server_ud {
  server *s;
  int port;
  char address[sizeof(((struct sockaddr_un *)0)->sun_path) + 8];
} server_ud;

struct server {
  h2o_globalconf_t config;
  h2o_context_t ctx;
  h2o_accept_ctx_t accept_ctx;
  int h2o_live;
  union {
    uv_tcp_t tcp;
    uv_pipe_t pipe;
  } listener;
  uv_timer_t sweep, deadline;
  int is_unix, listening;
  char unix_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
  http_limits lim;
  uint64_t header_ms, body_ms, idle_ms;
  int max_conns;
  int handler_ref, self_ref;
  server_ud *ud;
  conn *conns;
  int nconns, in_flight, ntokens, handles, state, deadline_passed;
  uint64_t requests;
  closer *closers;
};

static uv_loop_t *loop(void) { return ops_loop(); }

static void server_maybe_free(server *s) {
  if (s->state != S_CLOSED || s->handles > 0 || s->nconns > 0 || s->ntokens > 0) return;
  if (s->ud) s->ud->s = NULL;
  free(s);
}

static void server_handle_closed(uv_handle_t *h) {
  server *s = h->data;
  s->handles--;
  server_maybe_free(s);
}

static void server_finish(server *s);

static void server_maybe_finish(server *s) {
  if (s->state != S_CLOSING || s->listening || s->nconns > 0) return;
  if (s->in_flight > 0 && !s->deadline_passed) return;
  server_finish(s);
}

/* Ends a connection from outside h2o: h2o reads end-of-file (or fails its next write) and
 * closes it the normal way. */
static void conn_shutdown(conn *c) {
  if (c->sock == NULL || c->cut) return;
  c->cut = 1;
  int fd = h2o_socket_get_fd(c->sock);
  if (fd >= 0) shutdown(fd, SHUT_RDWR);
}

static void conn_closed(uv_handle_t *h) {
  conn *c = (conn *)h;
  server *s = c->s;
  if (c->busy) c->busy->c = NULL;
  if (c->prev)
    c->prev->next = c->next;
  else if (s->conns == c)
    s->conns = c->next;
  if (c->next) c->next->prev = c->prev;
  free(c);
  s->nconns--;
  server_maybe_finish(s);
  server_maybe_free(s);
}

static void on_sock_disposed(void *data) {
  conn *c = data;
  c->sock = NULL;
}

/* ---- timeouts ---- */

static const char timeout_response[] =
    "HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: 16\r\n\r\n"
    "request timeout\n";

/* h2o is neither writing nor about to (the connection is between requests or reading
 * one), so the 408 can go straight to the socket before it is shut. */
static void conn_time_out(conn *c, int say_so) {
  if (c->sock == NULL || c->cut) return;
  int fd = h2o_socket_get_fd(c->sock);
  if (say_so && fd >= 0) {
    ssize_t n = send(fd, timeout_response, sizeof timeout_response - 1, MSG_DONTWAIT | MSG_NOSIGNAL);
    (void)n;
  }
  conn_shutdown(c);
}

static void on_sweep(uv_timer_t *t) {
  server *s = t->data;
  uint64_t now = uv_now(loop());
  for (conn *c = s->conns, *next; c; c = next) {
    next = c->next;
    if (c->sock == NULL || c->cut) continue;
    if (c->busy) {
      /* the response is being sent: a client that does not read it gets body_timeout */
      if (c->busy->answered && now - c->busy->answered_at >= s->body_ms) conn_shutdown(c);
      continue;
    }
    h2o_buffer_t *in = c->sock->input;
    if (c->phase == PH_IDLE && in->size > 0) {
      c->phase = PH_HEADER;
      c->since = now;
      c->scanned = 0;
    }
    if (c->phase == PH_HEADER && scan_header_end(in->bytes, in->size, &c->scanned) > 0) {
      c->phase = PH_BODY;
      c->since = now;
    }
    uint64_t limit = c->phase == PH_IDLE ? s->idle_ms : c->phase == PH_HEADER ? s->header_ms : s->body_ms;
    if (now - c->since >= limit) conn_time_out(c, c->phase != PH_IDLE);
  }
}

/* ---- requests ---- */

static void token_release(token *k) {
  lua_State *L = ops_main_state();
  luaL_unref(L, LUA_REGISTRYINDEX, k->self_ref);
  k->self_ref = LUA_NOREF;
}

/* h2o disposes of the request: the response is out, or the connection is gone. */
static void on_req_disposed(void *slot) {
  token *k = *(token **)slot;
  if (k == NULL) return;
  k->req = NULL;
  conn *c = k->c;
  if (c && c->busy == k) {
    c->busy = NULL;
    c->phase = PH_IDLE;
    c->since = uv_now(loop());
    c->scanned = 0;
  }
  k->c = NULL;
  token_release(k);
}

static const char *reason_phrase(int status) {
  switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 303: return "See Other";
    case 304: return "Not Modified";
    case 307: return "Temporary Redirect";
    case 308: return "Permanent Redirect";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 410: return "Gone";
    case 413: return "Payload Too Large";
    case 415: return "Unsupported Media Type";
    case 422: return "Unprocessable Content";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    default: return status < 200 ? "Informational" : status < 300 ? "OK" : status < 400 ? "Redirect"
                  : status < 500 ? "Client Error" : "Server Error";
  }
}

static void send_plain(h2o_req_t *req, int status, const char *body, int close) {
  if (close) req->http1_is_persistent = 0;
  req->res.status = status;
  req->res.reason = reason_phrase(status);
  h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_CONTENT_TYPE, NULL, H2O_STRLIT("text/plain"));
  req->res.content_length = strlen(body);
  h2o_send_inline(req, body, strlen(body));
}

typedef struct {
  server *s;
  h2o_req_t *req;
  conn *c;
  const http_request *r;
  token *k;
} dispatch_ctx;

/* The request as plain data; the header array lives in the request's pool. */
static void request_view(h2o_req_t *req, conn *c, http_request *r) {
  http_header *hs = h2o_mem_alloc_pool(&req->pool, sizeof *hs * (req->headers.size + 1));
  for (size_t i = 0; i < req->headers.size; i++) {
    h2o_header_t *e = req->headers.entries + i;
    hs[i].name = e->name->base;
    hs[i].name_len = e->name->len;
    hs[i].value = e->value.base;
    hs[i].value_len = e->value.len;
  }
  memset(r, 0, sizeof *r);
  r->method = req->input.method.base;
  r->method_len = req->input.method.len;
  r->target = req->input.path.base;
  r->target_len = req->input.path.len;
  /* without a Host header, h2o fills in its host entry's name: that is not the client's */
  if (req->input.authority.base != req->hostconf->authority.hostport.base &&
      req->input.authority.base != req->hostconf->authority.host.base) {
    r->authority = req->input.authority.base;
    r->authority_len = req->input.authority.len;
  }
  r->headers = hs;
  r->nheaders = req->headers.size;
  r->has_body = req->entity.base != NULL;
  r->body = req->entity.base;
  r->body_len = req->entity.len;
  r->remote = c ? c->remote : "";
}

/* Under ops_pcall: builds req and hands dispatch(token, handler, req) the request, which
 * runs it in a task (runner_src). */
static int dispatch(lua_State *L) {
  dispatch_ctx *d = lua_touserdata(L, 1);
  h2o_req_t *req = d->req;
  server *s = d->s;
  lua_settop(L, 0);
  lua_getfield(L, LUA_REGISTRYINDEX, DISPATCH_KEY); /* 1 */

  token *k = lua_newuserdatauv(L, sizeof *k, 0); /* 2 */
  memset(k, 0, sizeof *k);
  k->self_ref = LUA_NOREF;
  luaL_setmetatable(L, TOKEN_MT);
  k->s = s;
  s->ntokens++;
  lua_rawgeti(L, LUA_REGISTRYINDEX, s->handler_ref); /* 3 */
  push_request(L, d->r);                             /* 4 */

  /* from here nothing can fail before the task has the request, except dispatch itself */
  token **slot = h2o_mem_alloc_shared(&req->pool, sizeof *slot, on_req_disposed);
  *slot = k;
  k->req = req;
  k->c = d->c;
  if (d->c) d->c->busy = k;
  lua_pushvalue(L, 2);
  k->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  k->in_flight = 1;
  s->in_flight++;
  d->k = k;
  lua_call(L, 3, 0); /* dispatch(token, handler, req) */
  return 0;
}

/* h2o handler: every request of the server comes here. */
static int on_req(h2o_handler_t *self, h2o_req_t *req) {
  server *s = ((route *)self)->s;
  h2o_socket_t *sock = req->conn->callbacks->get_socket ? req->conn->callbacks->get_socket(req->conn) : NULL;
  conn *c = sock ? sock->on_close.data : NULL;
  s->requests++;
  if (s->state != S_OPEN) req->http1_is_persistent = 0;

  http_request r;
  request_view(req, c, &r);
  int refuse = request_check_limits(&r, &s->lim);
  if (refuse) {
    send_plain(req, refuse, refuse == 431 ? "request header fields too large\n" : "request body too large\n", 1);
    return 0;
  }

  lua_State *L = ops_main_state();
  dispatch_ctx d = {s, req, c, &r, NULL};
  lua_pushcfunction(L, dispatch);
  lua_pushlightuserdata(L, &d);
  if (ops_pcall(L, 1, 0) != LUA_OK) {
    token *k = d.k;
    if (k && !k->answered) {
      k->answered = 1;
      k->answered_at = uv_now(loop());
      if (k->in_flight) {
        k->in_flight = 0;
        s->in_flight--;
      }
    }
    send_plain(req, 500, "internal server error\n", 0);
  }
  return 0;
}

/* ---- accepting ---- */

static void format_addr(const struct sockaddr *sa, char *buf, size_t len) {
  char ip[INET6_ADDRSTRLEN] = "?";
  if (sa->sa_family == AF_INET6) {
    const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)sa;
    uv_ip6_name(a, ip, sizeof ip);
    snprintf(buf, len, "[%s]:%d", ip, ntohs(a->sin6_port));
  } else if (sa->sa_family == AF_INET) {
    const struct sockaddr_in *a = (const struct sockaddr_in *)sa;
    uv_ip4_name(a, ip, sizeof ip);
    snprintf(buf, len, "%s:%d", ip, ntohs(a->sin_port));
  } else {
    snprintf(buf, len, "unix");
  }
}

static void on_accept(uv_stream_t *listener, int status) {
  server *s = listener->data;
  if (status < 0 || s->state != S_OPEN) return;
  conn *c = calloc(1, sizeof *c);
  if (c == NULL) return;
  c->s = s;
  if (s->is_unix)
    uv_pipe_init(loop(), &c->h.pipe, 0);
  else
    uv_tcp_init(loop(), &c->h.tcp);
  s->nconns++;
  c->next = s->conns;
  if (s->conns) s->conns->prev = c;
  s->conns = c;
  if (uv_accept(listener, (uv_stream_t *)&c->h) != 0 || s->nconns > s->max_conns) {
    uv_close((uv_handle_t *)&c->h, conn_closed); /* past max_connections: closed at once */
    return;
  }
  if (s->is_unix) {
    snprintf(c->remote, sizeof c->remote, "unix");
  } else {
    struct sockaddr_storage ss;
    int len = sizeof ss;
    if (uv_tcp_getpeername(&c->h.tcp, (struct sockaddr *)&ss, &len) == 0)
      format_addr((struct sockaddr *)&ss, c->remote, sizeof c->remote);
    uv_tcp_nodelay(&c->h.tcp, 1);
  }
  c->sock = h2o_uv_socket_create((uv_stream_t *)&c->h, conn_closed);
  c->sock->on_close.cb = on_sock_disposed;
  c->sock->on_close.data = c;
  c->phase = PH_HEADER; /* a new connection owes us a request header */
  c->since = uv_now(loop());
  h2o_accept(&s->accept_ctx, c->sock);
}

/* ---- closing ---- */

static void closer_cancel(ops_wait *w) {
  closer *cl = (closer *)w;
  server *s = cl->s;
  for (closer **p = &s->closers; *p; p = &(*p)->next)
    if (*p == cl) {
      *p = cl->next;
      break;
    }
  free(cl);
}

/* Everything is closed: let h2o go, and wake whoever waits in server:close(). */
static void server_finish(server *s) {
  lua_State *L = ops_main_state();
  s->state = S_CLOSED;
  h2o_context_dispose(&s->ctx);
  h2o_config_dispose(&s->config);
  s->h2o_live = 0;
  uv_timer_stop(&s->sweep);
  uv_timer_stop(&s->deadline);
  uv_close((uv_handle_t *)&s->sweep, server_handle_closed);
  uv_close((uv_handle_t *)&s->deadline, server_handle_closed);
  if (s->is_unix) unlink(s->unix_path);
  luaL_unref(L, LUA_REGISTRYINDEX, s->handler_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, s->self_ref);
  s->handler_ref = s->self_ref = LUA_NOREF;
  while (s->closers) {
    closer *cl = s->closers;
    s->closers = cl->next;
    lua_State *co = ops_wait_thread(&cl->w);
    if (co) {
      lua_checkstack(co, 1);
      lua_pushboolean(co, 1);
      ops_wait_complete(&cl->w, 1);
    }
    free(cl);
  }
}

static void on_listener_closed(uv_handle_t *h) {
  server *s = h->data;
  s->listening = 0;
  s->handles--;
  server_maybe_finish(s);
  server_maybe_free(s);
}

/* The deadline passed: answer what is still waiting for its handler with 503, and shut
 * every connection. */
static void on_deadline(uv_timer_t *t) {
  server *s = t->data;
  s->deadline_passed = 1;
  for (conn *c = s->conns, *next; c; c = next) {
    next = c->next;
    token *k = c->busy;
    if (k && k->req && !k->answered) {
      k->answered = 1;
      k->answered_at = uv_now(loop());
      send_plain(k->req, 503, "server is shutting down\n", 1);
    }
    conn_shutdown(c);
  }
  server_maybe_finish(s);
}

static void server_begin_close(server *s, double deadline) {
  uint64_t ms = deadline <= 0 ? 0 : deadline > 1e9 ? (uint64_t)1e12 : (uint64_t)(deadline * 1000.0 + 0.5);
  if (s->state == S_OPEN) {
    s->state = S_CLOSING;
    uv_close((uv_handle_t *)&s->listener, on_listener_closed);
    /* what h2o_context_request_shutdown does for HTTP/1 (its HTTP/2 part arms a timer that
     * h2o_context_dispose then trips over): new requests are answered with close */
    s->ctx.shutdown_requested = 1;
    /* connections between requests go now; the others once their response is out */
    for (conn *c = s->conns; c; c = c->next)
      if (c->busy == NULL && c->sock && c->sock->input->size == 0) conn_shutdown(c);
    uv_timer_start(&s->deadline, on_deadline, ms, 0);
  } else if (s->state == S_CLOSING && !s->deadline_passed) {
    uint64_t left = uv_timer_get_due_in(&s->deadline);
    if (ms < left) uv_timer_start(&s->deadline, on_deadline, ms, 0);
  }
}

/* ---- Lua bindings ---- */

static server_ud *check_server(lua_State *L) { return luaL_checkudata(L, 1, SERVER_MT); }

static double opt_positive(lua_State *L, int opts, const char *key, double dflt) {
  lua_getfield(L, opts, key);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return dflt;
  }
  if (!lua_isnumber(L, -1))
    luaL_argerror(L, 1, lua_pushfstring(L, "opts.%s must be a number, not a %s", key, luaL_typename(L, -1)));
  double v = lua_tonumber(L, -1);
  if (!(v > 0)) luaL_argerror(L, 1, lua_pushfstring(L, "opts.%s must be positive", key));
  lua_pop(L, 1);
  return v;
}

static int fail_env(lua_State *L, int rc, const char *listen, const char *what) {
  lua_pushnil(L);
  lua_pushfstring(L, "listen %s: %s: %s", listen, uv_err_name(rc), what ? what : uv_strerror(rc));
  lua_pushstring(L, uv_err_name(rc));
  return 3;
}

/* A socket file is stale when nothing accepts on it any more. */
static int unix_path_in_use(const char *path) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return 0;
  struct sockaddr_un a;
  memset(&a, 0, sizeof a);
  a.sun_family = AF_UNIX;
  strncpy(a.sun_path, path, sizeof a.sun_path - 1);
  int in_use = connect(fd, (struct sockaddr *)&a, sizeof a) == 0;
  close(fd);
  return in_use;
}

/* Binds and listens; returns 0 or a libuv error, with *what for a message of our own. */
static int server_listen(server *s, server_ud *ud, const char *listen, const char **what) {
  int rc;
  if (strncmp(listen, "unix:", 5) == 0) {
    const char *path = listen + 5;
    s->is_unix = 1;
    uv_pipe_init(loop(), &s->listener.pipe, 0);
    s->listener.pipe.data = s;
    s->handles++;
    s->listening = 1;
    if (*path == '\0') {
      *what = "the socket path is empty";
      return UV_EINVAL;
    }
    if (strlen(path) >= sizeof s->unix_path) {
      *what = "the socket path is too long";
      return UV_ENAMETOOLONG;
    }
    strcpy(s->unix_path, path);
    struct stat st;
    if (lstat(path, &st) == 0) {
      if (!S_ISSOCK(st.st_mode)) {
        *what = "a file that is not a socket is in the way";
        return UV_EADDRINUSE;
      }
      if (unix_path_in_use(path)) {
        *what = "another server is listening on this socket";
        return UV_EADDRINUSE;
      }
      unlink(path);
    }
    if ((rc = uv_pipe_bind(&s->listener.pipe, path)) != 0) return rc;
    snprintf(ud->address, sizeof ud->address, "unix:%s", path);
    ud->port = -1;
  } else {
    char host[INET6_ADDRSTRLEN + 2];
    const char *colon = strrchr(listen, ':');
    if (colon == NULL || colon == listen || (size_t)(colon - listen) >= sizeof host) {
      *what = "expected \"IP:PORT\", \"[IPv6]:PORT\" or \"unix:/path\"";
      return UV_EINVAL;
    }
    memcpy(host, listen, (size_t)(colon - listen));
    host[colon - listen] = '\0';
    char *endp;
    long port = strtol(colon + 1, &endp, 10);
    if (colon[1] == '\0' || *endp != '\0' || port < 0 || port > 65535) {
      *what = "the port must be a number from 0 to 65535";
      return UV_EINVAL;
    }
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof ss);
    size_t hl = strlen(host);
    if (host[0] == '[' && hl > 2 && host[hl - 1] == ']') {
      host[hl - 1] = '\0';
      rc = uv_ip6_addr(host + 1, (int)port, (struct sockaddr_in6 *)&ss);
    } else {
      rc = uv_ip4_addr(host, (int)port, (struct sockaddr_in *)&ss);
    }
    uv_tcp_init(loop(), &s->listener.tcp);
    s->listener.tcp.data = s;
    s->handles++;
    s->listening = 1;
    if (rc != 0) {
      *what = "the host must be an IPv4 address or an IPv6 address in brackets";
      return UV_EINVAL;
    }
    if ((rc = uv_tcp_bind(&s->listener.tcp, (struct sockaddr *)&ss, 0)) != 0) return rc;
  }
  if ((rc = uv_listen((uv_stream_t *)&s->listener, 511, on_accept)) != 0) return rc;
  if (!s->is_unix) {
    struct sockaddr_storage ss;
    int len = sizeof ss;
    uv_tcp_getsockname(&s->listener.tcp, (struct sockaddr *)&ss, &len);
    format_addr((struct sockaddr *)&ss, ud->address, sizeof ud->address);
    ud->port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                               : ((struct sockaddr_in *)&ss)->sin_port);
  }
  return 0;
}

static void server_setup_h2o(server *s) {
  h2o_config_init(&s->config);
  s->config.server_name = h2o_iovec_init(H2O_STRLIT("opsrun"));
  s->config.max_request_entity_size = s->lim.max_body;
  s->config.http1.upgrade_to_http2 = 0;
  /* h2o's single request timer only as a backstop: the sweep enforces the real ones */
  s->config.http1.req_timeout = s->header_ms + s->body_ms + s->idle_ms + 1000;
  h2o_hostconf_t *host = h2o_config_register_host(&s->config, h2o_iovec_init(H2O_STRLIT("default")), 65535);
  h2o_pathconf_t *path = h2o_config_register_path(host, "/", 0);
  route *r = (route *)h2o_create_handler(path, sizeof *r);
  r->super.on_req = on_req;
  r->s = s;
  h2o_context_init(&s->ctx, loop(), &s->config);
  s->accept_ctx.ctx = &s->ctx;
  s->accept_ctx.hosts = s->config.hosts;
  s->h2o_live = 1;
}

/* core.serve(opts) -> server | nil, err, code
 * opts: listen, handler, max_body, max_header, header_timeout, body_timeout, idle_timeout,
 * max_connections */
static int l_serve(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  lua_getfield(L, 1, "listen");
  const char *listen = lua_tostring(L, -1);
  if (lua_type(L, -1) != LUA_TSTRING) return luaL_argerror(L, 1, "opts.listen must be a string (\"127.0.0.1:8080\", \"[::1]:0\", \"unix:/path\")");
  lua_getfield(L, 1, "handler");
  if (lua_type(L, -1) != LUA_TFUNCTION) return luaL_argerror(L, 1, "opts.handler must be a function(req) -> status, headers, body");
  double max_body = opt_positive(L, 1, "max_body", DEFAULT_MAX_BODY);
  double max_header = opt_positive(L, 1, "max_header", DEFAULT_MAX_HEADER);
  double header_t = opt_positive(L, 1, "header_timeout", DEFAULT_HEADER_TIMEOUT);
  double body_t = opt_positive(L, 1, "body_timeout", DEFAULT_BODY_TIMEOUT);
  double idle_t = opt_positive(L, 1, "idle_timeout", DEFAULT_IDLE_TIMEOUT);
  double max_conns = opt_positive(L, 1, "max_connections", DEFAULT_MAX_CONNECTIONS);

  server_ud *ud = lua_newuserdatauv(L, sizeof *ud, 0); /* 4: created closed */
  memset(ud, 0, sizeof *ud);
  luaL_setmetatable(L, SERVER_MT);
  server *s = calloc(1, sizeof *s);
  if (s == NULL) return luaL_error(L, "out of memory");
  s->handler_ref = s->self_ref = LUA_NOREF;
  s->lim.max_body = max_body > 1e15 ? (size_t)1e15 : (size_t)max_body;
  s->lim.max_header = max_header > 1e15 ? (size_t)1e15 : (size_t)max_header;
  s->header_ms = (uint64_t)(header_t * 1000 + 0.5);
  s->body_ms = (uint64_t)(body_t * 1000 + 0.5);
  s->idle_ms = (uint64_t)(idle_t * 1000 + 0.5);
  s->max_conns = max_conns > 1e6 ? 1000000 : (int)max_conns;
  if (s->max_conns < 1) s->max_conns = 1;

  const char *what = NULL;
  int rc = server_listen(s, ud, listen, &what);
  if (rc != 0) {
    s->state = S_CLOSED;
    if (s->listening)
      uv_close((uv_handle_t *)&s->listener, on_listener_closed);
    else
      free(s);
    return fail_env(L, rc, listen, what);
  }
  server_setup_h2o(s);
  uint64_t tick = s->header_ms;
  if (s->body_ms < tick) tick = s->body_ms;
  if (s->idle_ms < tick) tick = s->idle_ms;
  tick /= 4;
  if (tick < 10) tick = 10;
  if (tick > 1000) tick = 1000;
  uv_timer_init(loop(), &s->sweep);
  uv_timer_init(loop(), &s->deadline);
  s->sweep.data = s->deadline.data = s;
  s->handles += 2;
  uv_timer_start(&s->sweep, on_sweep, tick, tick);
  uv_unref((uv_handle_t *)&s->sweep); /* the listener keeps the loop alive, not the sweep */

  lua_pushvalue(L, 3);
  s->handler_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushvalue(L, 4);
  s->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  ud->s = s;
  s->ud = ud;
  lua_settop(L, 4);
  return 1;
}

/* server:close([deadline_seconds]) -> true : stops accepting, waits for the requests in
 * flight (up to the deadline, 30 s by default), then closes what is left */
static int l_close(lua_State *L) {
  server_ud *ud = check_server(L);
  double deadline = luaL_optnumber(L, 2, DEFAULT_CLOSE_DEADLINE);
  server *s = ud->s;
  if (s == NULL || s->state == S_CLOSED) {
    lua_pushboolean(L, 1);
    return 1;
  }
  ops_check_task(L, "server:close");
  closer *cl = calloc(1, sizeof *cl);
  if (cl == NULL) return luaL_error(L, "out of memory");
  cl->s = s;
  cl->w.cancel = closer_cancel;
  cl->next = s->closers;
  s->closers = cl;
  server_begin_close(s, deadline);
  if (s->state == S_CLOSING) server_maybe_finish(s);
  if (s->state == S_CLOSED) { /* finished at once: the closer was completed already */
    lua_pushboolean(L, 1);
    return 1;
  }
  lua_settop(L, 1);
  return ops_wait_begin(L, &cl->w, -1);
}

/* server:stats() -> {connections, requests, in_flight} */
static int l_stats(lua_State *L) {
  server_ud *ud = check_server(L);
  server *s = ud->s;
  lua_createtable(L, 0, 3);
  lua_pushinteger(L, s && s->state != S_CLOSED ? s->nconns : 0);
  lua_setfield(L, -2, "connections");
  lua_pushinteger(L, s ? (lua_Integer)s->requests : 0);
  lua_setfield(L, -2, "requests");
  lua_pushinteger(L, s ? s->in_flight : 0);
  lua_setfield(L, -2, "in_flight");
  return 1;
}

static int l_server_index(lua_State *L) {
  server_ud *ud = check_server(L);
  const char *k = luaL_checkstring(L, 2);
  if (strcmp(k, "port") == 0) {
    if (ud->port < 0) return 0;
    lua_pushinteger(L, ud->port);
    return 1;
  }
  if (strcmp(k, "address") == 0) {
    lua_pushstring(L, ud->address);
    return 1;
  }
  lua_getmetatable(L, 1);
  lua_getfield(L, -1, "methods");
  lua_getfield(L, -1, k);
  return 1;
}

static int l_server_tostring(lua_State *L) {
  server_ud *ud = check_server(L);
  int open = ud->s && ud->s->state == S_OPEN;
  lua_pushfstring(L, "http server %s (%s)", ud->address, open ? "open" : "closed");
  return 1;
}

/* A to-be-closed server starts closing at once; it cannot wait there. */
static int l_server_close_now(lua_State *L) {
  server_ud *ud = check_server(L);
  if (ud->s && ud->s->state != S_CLOSED) {
    server_begin_close(ud->s, 0);
    server_maybe_finish(ud->s);
  }
  return 0;
}

static int l_server_gc(lua_State *L) {
  server_ud *ud = check_server(L);
  if (ud->s) ud->s->ud = NULL;
  ud->s = NULL;
  return 0;
}

static int valid_token_char(int c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
         (c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

static int valid_value(const char *v, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (v[i] == '\r' || v[i] == '\n' || v[i] == '\0') return 0;
  return 1;
}

/* core._respond(token, status, headers, body) -> true | nil, err, "closed"
 * raises when the response is not valid (the runner answers 500 then) */
static int l_respond(lua_State *L) {
  token *k = luaL_checkudata(L, 1, TOKEN_MT);
  lua_Integer status = 0;
  if (lua_isinteger(L, 2)) status = lua_tointeger(L, 2);
  else if (lua_type(L, 2) == LUA_TNUMBER) {
    lua_Number n = lua_tonumber(L, 2);
    if (n == (lua_Number)(lua_Integer)n) status = (lua_Integer)n;
  }
  if (status < 100 || status > 599)
    return luaL_argerror(L, 2, lua_pushfstring(L, "status must be an integer from 100 to 599, not %s", luaL_tolstring(L, 2, NULL)));
  if (!lua_isnoneornil(L, 3) && !lua_istable(L, 3))
    return luaL_argerror(L, 3, lua_pushfstring(L, "headers must be a table, not a %s", luaL_typename(L, 3)));
  size_t blen = 0;
  const char *body = "";
  if (!lua_isnoneornil(L, 4)) {
    if (lua_type(L, 4) != LUA_TSTRING)
      return luaL_argerror(L, 4, lua_pushfstring(L, "body must be a string, not a %s", luaL_typename(L, 4)));
    body = lua_tolstring(L, 4, &blen);
  }
  int nheaders = 0;
  if (lua_istable(L, 3)) {
    lua_pushnil(L);
    while (lua_next(L, 3)) {
      size_t nl, vl;
      if (lua_type(L, -2) != LUA_TSTRING) return luaL_argerror(L, 3, "header names must be strings");
      const char *name = lua_tolstring(L, -2, &nl);
      if (nl == 0) return luaL_argerror(L, 3, "a header name is empty");
      for (size_t i = 0; i < nl; i++)
        if (!valid_token_char((unsigned char)name[i]))
          return luaL_argerror(L, 3, lua_pushfstring(L, "header name '%s' has a character HTTP does not allow", name));
      int vt = lua_type(L, -1);
      if (vt != LUA_TSTRING && vt != LUA_TNUMBER)
        return luaL_argerror(L, 3, lua_pushfstring(L, "header '%s' must be a string, not a %s", name, luaL_typename(L, -1)));
      lua_pushvalue(L, -1);
      const char *v = lua_tolstring(L, -1, &vl); /* a copy: converting a number in place would confuse lua_next */
      if (!valid_value(v, vl))
        return luaL_argerror(L, 3, lua_pushfstring(L, "header '%s' contains a line break or NUL", name));
      lua_pop(L, 2);
      nheaders++;
    }
  }

  server *s = k->s;
  if (k->in_flight) {
    k->in_flight = 0;
    s->in_flight--;
  }
  if (k->req == NULL || k->answered) {
    k->answered = 1;
    if (s->state == S_CLOSING) server_maybe_finish(s);
    lua_pushnil(L);
    lua_pushliteral(L, "the client is gone (or the server answered for the handler): response dropped");
    lua_pushliteral(L, "closed");
    return 3;
  }
  h2o_req_t *req = k->req;
  k->answered = 1;
  k->answered_at = uv_now(loop());
  req->res.status = (int)status;
  req->res.reason = reason_phrase((int)status);
  if (nheaders > 0) {
    lua_pushnil(L);
    while (lua_next(L, 3)) {
      size_t nl, vl;
      const char *name = lua_tolstring(L, -2, &nl);
      lua_pushvalue(L, -1);
      const char *v = lua_tolstring(L, -1, &vl);
      char *lname = h2o_mem_alloc_pool(&req->pool, nl);
      for (size_t i = 0; i < nl; i++) lname[i] = (char)((name[i] >= 'A' && name[i] <= 'Z') ? name[i] + 32 : name[i]);
      if ((nl == 14 && memcmp(lname, "content-length", 14) == 0) || (nl == 17 && memcmp(lname, "transfer-encoding", 17) == 0)) {
        /* framing is ours */
      } else if (nl == 10 && memcmp(lname, "connection", 10) == 0) {
        if (h2o_contains_token(v, vl, H2O_STRLIT("close"), ',')) req->http1_is_persistent = 0;
      } else {
        h2o_iovec_t val = h2o_strdup(&req->pool, v, vl);
        h2o_add_header_by_str(&req->pool, &req->res.headers, lname, nl, 1, NULL, val.base, val.len);
      }
      lua_pop(L, 2);
    }
  }
  if (s->state != S_OPEN) req->http1_is_persistent = 0;
  if (status < 200 || status == 204 || status == 304) {
    /* no body for these, and no length either */
    static h2o_generator_t generator = {NULL, NULL};
    h2o_start_response(req, &generator);
    h2o_send(req, NULL, 0, H2O_SEND_STATE_FINAL);
  } else {
    req->res.content_length = blen;
    h2o_send_inline(req, body, blen);
  }
  lua_pushboolean(L, 1);
  return 1;
}

static int l_token_gc(lua_State *L) {
  token *k = luaL_checkudata(L, 1, TOKEN_MT);
  server *s = k->s;
  if (s == NULL) return 0;
  k->s = NULL;
  if (k->in_flight) { /* the task ended without answering (it was cancelled) */
    k->in_flight = 0;
    s->in_flight--;
    server_maybe_finish(s);
  }
  s->ntokens--;
  server_maybe_free(s);
  return 0;
}

/* Runs each request's handler in a task and answers through core._respond. Errors are
 * logged with their traceback; the client only learns that something went wrong. A task
 * whose request is answered waits for the next one (up to IDLE tasks wait), so that a busy
 * server does not create, grow and collect a coroutine per request; only a wake from
 * dispatch (marked NEXT) hands it one, and any other wake of a waiting task is ignored. */
static const char runner_src[] =
    "local respond, spawn, suspend, wake, current = ...\n"
    "local function report(req, what)\n"
    "  local ok, log = pcall(require, 'ops.log')\n"
    "  local msg = string.format('http server: %s %s: %s', tostring(req.method), tostring(req.path), what)\n"
    "  if ok then log.error('%s', msg) else io.stderr:write(msg, '\\n') end\n"
    "end\n"
    "local function trace(e) return debug.traceback(tostring(e), 2) end\n"
    "local function run(token, handler, req)\n"
    "  local ok, status, headers, body = xpcall(handler, trace, req)\n"
    "  if ok then\n"
    "    local sent, err = pcall(respond, token, status, headers, body)\n"
    "    if sent then return end\n"
    "    report(req, 'the handler returned an invalid response: ' .. tostring(err))\n"
    "  else\n"
    "    report(req, 'the handler failed: ' .. tostring(status))\n"
    "  end\n"
    "  respond(token, 500, {['content-type'] = 'text/plain'}, 'internal server error\\n')\n"
    "end\n"
    "local IDLE, NEXT = 64, {}\n"
    "local idle, nidle = {}, 0\n"
    "local function runner(token, handler, req)\n"
    "  while true do\n"
    "    run(token, handler, req)\n"
    "    if nidle >= IDLE then return end\n"
    "    nidle = nidle + 1\n"
    "    idle[nidle] = current()\n"
    "    local mark\n"
    "    repeat mark, token, handler, req = suspend() until mark == NEXT\n"
    "  end\n"
    "end\n"
    "return function(token, handler, req)\n"
    "  while nidle > 0 do\n"
    "    local t = idle[nidle]\n"
    "    idle[nidle] = nil\n"
    "    nidle = nidle - 1\n"
    "    if wake(t, NEXT, token, handler, req) then return end\n"
    "    -- woken by something else just now: it waits again at once, but no longer in line\n"
    "  end\n"
    "  spawn(runner, token, handler, req)\n"
    "end\n";

int luaopen_ops_core_http_server(lua_State *L) {
  static const luaL_Reg methods[] = {{"close", l_close}, {"stats", l_stats}, {NULL, NULL}};
  static const luaL_Reg funcs[] = {{"serve", l_serve}, {"_respond", l_respond}, {NULL, NULL}};
  if (luaL_newmetatable(L, SERVER_MT)) {
    luaL_newlib(L, methods);
    lua_setfield(L, -2, "methods");
    lua_pushcfunction(L, l_server_index);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, l_server_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pushcfunction(L, l_server_close_now);
    lua_setfield(L, -2, "__close");
    lua_pushcfunction(L, l_server_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  if (luaL_newmetatable(L, TOKEN_MT)) {
    lua_pushcfunction(L, l_token_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  luaL_newlib(L, funcs);
  if (luaL_loadbufferx(L, runner_src, sizeof runner_src - 1, "=ops.core.http_server runner", "t") != LUA_OK)
    return lua_error(L);
  lua_getfield(L, -2, "_respond");
  lua_getglobal(L, "require");
  lua_pushliteral(L, "ops.core.sched");
  lua_call(L, 1, 1);
  int sched = lua_gettop(L);
  lua_getfield(L, sched, "spawn");
  lua_getfield(L, sched, "suspend");
  lua_getfield(L, sched, "wake");
  lua_getfield(L, sched, "current");
  lua_remove(L, sched);
  lua_call(L, 5, 1);
  lua_setfield(L, LUA_REGISTRYINDEX, DISPATCH_KEY);
  return 1;
}
