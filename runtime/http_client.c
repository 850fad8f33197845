/* http_client.c: HTTP requests with libcurl's multi interface, driven by the libuv loop.
 *
 * One multi handle (made on first use) carries every transfer. libcurl tells us which
 * sockets to watch (one uv_poll_t each) and when to call it back (one uv_timer_t); each
 * time libuv reports, we hand the event to curl_multi_socket_action and then collect the
 * finished transfers, completing the task that waits on each.
 *
 * A request is C memory owned by the multi while it runs: it ends either when libcurl
 * finishes it (the task gets the response) or when its wait is cancelled (timeout,
 * cancelled task), which takes the easy handle out of the multi and frees everything.
 * No Lua code runs inside a libcurl call, so neither path can re-enter the other.
 *
 * Error messages name "METHOD scheme://host:port/path" and never carry the URL's userinfo
 * or query, nor a password, token or Authorization value: libcurl's own detail text is
 * dropped when it contains any of them.
 *
 * libcurl is not linked but loaded (dlopen) by the first request: Debian's libcurl brings
 * some twenty libraries with it (gnutls, Kerberos, LDAP, libssh2, ...) and loading them
 * made every opsrun start-up several times slower, HTTP or not. <curl/curl.h> still gives
 * the types and constants; the functions are called through the `curl` table below.
 */
#define _GNU_SOURCE

#include "opsrun.h"

#include <curl/curl.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define GUARD_MT "ops.http_client.request"
#define HEADERS_MT "ops.http_client.headers"
#define SHUTDOWN_MT "ops.http_client.shutdown"

#define DEFAULT_TIMEOUT 60.0
#define DEFAULT_CONNECT_TIMEOUT 10.0
#define DEFAULT_MAX_BODY (64.0 * 1024 * 1024)
#define DEFAULT_USER_AGENT "opsrun/0.1"
#define MAX_REDIRECTS 10L
#define MAX_HEADER_BYTES (1024 * 1024)
/* A non-2xx body is kept in memory (for the message it carries) even with opts.output. */
#define MAX_ERROR_BODY (64 * 1024)
/* Our wait outlives libcurl's own total timeout by this much, as a safety net only. */
#define WAIT_MARGIN 5.0

typedef struct {
  char *data;
  size_t len, cap;
} buffer;

typedef struct sock sock;
struct sock {
  uv_poll_t poll;
  curl_socket_t fd;
  sock *next, *prev;
};

typedef struct request request;
struct request {
  ops_wait w;
  CURL *easy;
  struct curl_slist *headers;
  char *method;
  char *where; /* "scheme://host:port/path": what messages name */
  char **secrets;
  size_t nsecrets;
  int body_ref;  /* pins opts.body, which libcurl reads in place */
  FILE *body_file;
  char *output, *part; /* opts.output and the file written until success */
  int out_fd, part_created;
  int out_errno;
  size_t max_body;
  int too_large, oom, headers_too_large;
  buffer body, head;
  uint64_t start;
  char errbuf[CURL_ERROR_SIZE];
  request *next, *prev;
};

/* The guard userdata holds a request while its options are read, so an error raised
 * meanwhile frees it (__gc) instead of leaking it. */
typedef struct {
  request *r;
} guard;

/* ---- libcurl, loaded on first use ---- */

#define CURL_LIBRARY "libcurl.so.4"
#define CURL_FUNCTIONS(X)                                                                          \
  X(global_init) X(easy_init) X(easy_cleanup) X(easy_setopt) X(easy_getinfo) X(easy_strerror) X(free) \
  X(multi_init) X(multi_cleanup) X(multi_setopt) X(multi_add_handle) X(multi_remove_handle)          \
  X(multi_assign) X(multi_socket_action) X(multi_info_read) X(slist_append) X(slist_free_all) X(url) \
  X(url_cleanup) X(url_set) X(url_get) X(url_strerror)

/* curl.easy_init() calls curl_easy_init(): each member has the type of its libcurl function. */
static struct {
#define CURL_MEMBER(name) __typeof__(curl_##name) *name;
  CURL_FUNCTIONS(CURL_MEMBER)
#undef CURL_MEMBER
} curl;

static int curl_loaded;           /* 1: the table is filled; -1: loading failed */
static char curl_load_error[512]; /* why, when it failed (dlerror's text) */

/* Returns 1 once every function is resolved and libcurl initialised; 0 (curl_load_error says
 * why) when it cannot be. Tried once: the answer does not change while opsrun runs. */
static int curl_load(void) {
  if (curl_loaded) return curl_loaded > 0;
  curl_loaded = -1;
  void *lib = dlopen(CURL_LIBRARY, RTLD_NOW | RTLD_LOCAL);
  if (lib == NULL) {
    snprintf(curl_load_error, sizeof curl_load_error, "%s", dlerror());
    return 0;
  }
#define CURL_RESOLVE(name)                                                                    \
  if ((*(void **)&curl.name = dlsym(lib, "curl_" #name)) == NULL) {                            \
    snprintf(curl_load_error, sizeof curl_load_error, "%s", dlerror());                        \
    dlclose(lib);                                                                               \
    return 0;                                                                                   \
  }
  CURL_FUNCTIONS(CURL_RESOLVE)
#undef CURL_RESOLVE
  if (curl.global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
    snprintf(curl_load_error, sizeof curl_load_error, "%s: curl_global_init failed", CURL_LIBRARY);
    return 0; /* stays loaded: libcurl may have started threads or handlers we cannot undo */
  }
  curl_loaded = 1;
  return 1;
}

static CURLM *multi;
static uv_timer_t multi_timer;
static sock *socks;
static request *inflight;
static int shutting_down;

/* ---- buffers ---- */

static int buffer_add(buffer *b, const char *p, size_t n, size_t limit) {
  if (n > limit - b->len) return -1;
  if (b->len + n > b->cap) {
    size_t cap = b->cap ? b->cap : 16384;
    while (cap < b->len + n) cap = cap > SIZE_MAX / 2 ? SIZE_MAX : cap * 2;
    if (cap > limit) cap = limit;
    char *d = realloc(b->data, cap);
    if (d == NULL) return -2;
    b->data = d;
    b->cap = cap;
  }
  memcpy(b->data + b->len, p, n);
  b->len += n;
  return 0;
}

/* ---- request lifetime ---- */

static void inflight_link(request *r) {
  r->next = inflight;
  if (inflight) inflight->prev = r;
  inflight = r;
}

static void set_loop_ref(int on);

static void inflight_unlink(request *r) {
  if (r->prev)
    r->prev->next = r->next;
  else if (inflight == r)
    inflight = r->next;
  if (r->next) r->next->prev = r->prev;
  r->next = r->prev = NULL;
  if (inflight == NULL) set_loop_ref(0);
}

static void discard_output(request *r) {
  if (r->out_fd >= 0) close(r->out_fd);
  r->out_fd = -1;
  if (r->part_created) unlink(r->part);
  r->part_created = 0;
}

static void request_free(request *r) {
  if (r->easy) curl.easy_cleanup(r->easy);
  curl.slist_free_all(r->headers);
  if (r->body_file) fclose(r->body_file);
  if (r->out_fd >= 0) close(r->out_fd);
  if (r->body_ref != LUA_NOREF) luaL_unref(ops_main_state(), LUA_REGISTRYINDEX, r->body_ref);
  for (size_t i = 0; i < r->nsecrets; i++) free(r->secrets[i]);
  free(r->secrets);
  free(r->method);
  free(r->where);
  free(r->output);
  free(r->part);
  free(r->body.data);
  free(r->head.data);
  free(r);
}

/* Ends a running request without completing its wait: the task is gone or timed out. */
static void request_cancel(ops_wait *w) {
  request *r = (request *)((char *)w - offsetof(request, w));
  curl.multi_remove_handle(multi, r->easy);
  inflight_unlink(r);
  discard_output(r);
  request_free(r);
}

/* ---- the loop side of the multi handle ---- */

static void sock_closed(uv_handle_t *h) { free(h->data); }

static void sock_close(sock *s) {
  if (s->prev)
    s->prev->next = s->next;
  else if (socks == s)
    socks = s->next;
  if (s->next) s->next->prev = s->prev;
  uv_close((uv_handle_t *)&s->poll, sock_closed);
}

/* Idle connections in libcurl's cache must not keep opsrun running. */
static void set_loop_ref(int on) {
  for (sock *s = socks; s; s = s->next) {
    if (on)
      uv_ref((uv_handle_t *)&s->poll);
    else
      uv_unref((uv_handle_t *)&s->poll);
  }
  if (on)
    uv_ref((uv_handle_t *)&multi_timer);
  else
    uv_unref((uv_handle_t *)&multi_timer);
}

static void finish(request *r, CURLcode rc);

static void drain_completions(void) {
  CURLMsg *m;
  int left;
  while ((m = curl.multi_info_read(multi, &left)) != NULL) {
    if (m->msg != CURLMSG_DONE) continue;
    CURL *easy = m->easy_handle;
    CURLcode rc = m->data.result; /* m is invalid once the handle is removed */
    char *priv = NULL;
    curl.easy_getinfo(easy, CURLINFO_PRIVATE, &priv);
    curl.multi_remove_handle(multi, easy);
    finish((request *)priv, rc);
  }
}

static void on_poll(uv_poll_t *h, int status, int events) {
  sock *s = h->data;
  int flags = 0;
  if (status < 0)
    flags = CURL_CSELECT_ERR;
  else {
    if (events & UV_READABLE) flags |= CURL_CSELECT_IN;
    if (events & UV_WRITABLE) flags |= CURL_CSELECT_OUT;
  }
  int running;
  curl.multi_socket_action(multi, s->fd, flags, &running); /* may close s */
  drain_completions();
}

static void on_multi_timer(uv_timer_t *t) {
  (void)t;
  int running;
  curl.multi_socket_action(multi, CURL_SOCKET_TIMEOUT, 0, &running);
  drain_completions();
}

static int socket_cb(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp) {
  (void)easy;
  (void)userp;
  sock *s = socketp;
  if (shutting_down) return 0;
  if (what == CURL_POLL_REMOVE) {
    if (s) {
      curl.multi_assign(multi, fd, NULL);
      sock_close(s);
    }
    return 0;
  }
  if (s == NULL) {
    s = calloc(1, sizeof *s);
    if (s == NULL) return -1;
    if (uv_poll_init_socket(ops_loop(), &s->poll, fd) != 0) {
      free(s);
      return -1;
    }
    s->fd = fd;
    s->poll.data = s;
    s->next = socks;
    if (socks) socks->prev = s;
    socks = s;
    if (inflight == NULL) uv_unref((uv_handle_t *)&s->poll);
    curl.multi_assign(multi, fd, s);
  }
  int events = 0;
  if (what & CURL_POLL_IN) events |= UV_READABLE;
  if (what & CURL_POLL_OUT) events |= UV_WRITABLE;
  uv_poll_start(&s->poll, events, on_poll);
  return 0;
}

static int timer_cb(CURLM *m, long timeout_ms, void *userp) {
  (void)m;
  (void)userp;
  if (shutting_down) return 0;
  if (timeout_ms < 0)
    uv_timer_stop(&multi_timer);
  else
    uv_timer_start(&multi_timer, on_multi_timer, (uint64_t)timeout_ms, 0);
  return 0;
}

static int shutdown_gc(lua_State *L) {
  (void)L;
  if (multi == NULL) return 0;
  while (inflight) {
    request *r = inflight;
    inflight = r->next;
    curl.multi_remove_handle(multi, r->easy);
    discard_output(r);
    request_free(r);
  }
  shutting_down = 1;
  while (socks) sock_close(socks);
  uv_close((uv_handle_t *)&multi_timer, NULL);
  curl.multi_cleanup(multi);
  multi = NULL;
  return 0;
}

static void multi_start(lua_State *L) {
  if (multi) return;
  multi = curl.multi_init();
  if (multi == NULL) luaL_error(L, "http: cannot initialise libcurl");
  uv_timer_init(ops_loop(), &multi_timer);
  uv_unref((uv_handle_t *)&multi_timer);
  curl.multi_setopt(multi, CURLMOPT_SOCKETFUNCTION, socket_cb);
  curl.multi_setopt(multi, CURLMOPT_TIMERFUNCTION, timer_cb);
}

/* ---- transfer callbacks (no Lua here) ---- */

static int status_is_success(request *r) {
  long status = 0;
  curl.easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &status);
  return status >= 200 && status < 300;
}

static size_t on_body(char *p, size_t size, size_t n, void *ud) {
  request *r = ud;
  size_t len = size * n;
  if (r->out_fd >= 0 && status_is_success(r)) {
    size_t done = 0;
    while (done < len) {
      ssize_t w = write(r->out_fd, p + done, len - done);
      if (w < 0 && errno == EINTR) continue;
      if (w < 0) {
        r->out_errno = errno;
        return 0;
      }
      done += (size_t)w;
    }
    return len;
  }
  if (r->out_fd >= 0) { /* an error page: keep its start, for the caller to read */
    size_t room = MAX_ERROR_BODY - r->body.len;
    if (buffer_add(&r->body, p, len < room ? len : room, MAX_ERROR_BODY) == -2) r->oom = 1;
    return r->oom ? 0 : len;
  }
  int rc = buffer_add(&r->body, p, len, r->max_body);
  if (rc == -1) r->too_large = 1;
  if (rc == -2) r->oom = 1;
  return rc == 0 ? len : 0;
}

static size_t on_header(char *p, size_t size, size_t n, void *ud) {
  request *r = ud;
  size_t len = size * n;
  if (len >= 5 && memcmp(p, "HTTP/", 5) == 0) r->head.len = 0; /* a new response (redirect, 100) */
  int rc = buffer_add(&r->head, p, len, MAX_HEADER_BYTES);
  if (rc == -1) r->headers_too_large = 1;
  if (rc == -2) r->oom = 1;
  return rc == 0 ? len : 0;
}

/* ---- results ---- */

static void push_headers(lua_State *co, request *r) {
  lua_newtable(co);
  const char *p = r->head.data, *end = p + r->head.len;
  while (p < end) {
    const char *eol = memchr(p, '\n', (size_t)(end - p));
    const char *next = eol ? eol + 1 : end;
    if (eol == NULL) eol = end;
    const char *colon = memchr(p, ':', (size_t)(eol - p));
    if (colon && colon > p && *p != ' ' && *p != '\t' && memcmp(p, "HTTP/", 5) != 0) {
      luaL_Buffer b;
      luaL_buffinit(co, &b);
      for (const char *c = p; c < colon; c++) luaL_addchar(&b, (char)(*c >= 'A' && *c <= 'Z' ? *c + 32 : *c));
      luaL_pushresult(&b);
      const char *v = colon + 1, *ve = eol;
      while (v < ve && (*v == ' ' || *v == '\t')) v++;
      while (ve > v && (ve[-1] == '\r' || ve[-1] == ' ' || ve[-1] == '\t')) ve--;
      lua_pushvalue(co, -1);
      if (lua_rawget(co, -3) == LUA_TSTRING) {
        lua_pushliteral(co, ", ");
        lua_pushlstring(co, v, (size_t)(ve - v));
        lua_concat(co, 3);
      } else {
        lua_pop(co, 1);
        lua_pushlstring(co, v, (size_t)(ve - v));
      }
      lua_rawset(co, -3);
    }
    p = next;
  }
  luaL_setmetatable(co, HEADERS_MT);
}

/* The effective URL without its userinfo; the query stays (it is the caller's data). */
static void push_effective_url(lua_State *co, request *r) {
  char *eff = NULL, *clean = NULL;
  curl.easy_getinfo(r->easy, CURLINFO_EFFECTIVE_URL, &eff);
  CURLU *u = curl.url();
  if (u && eff && curl.url_set(u, CURLUPART_URL, eff, 0) == CURLUE_OK) {
    curl.url_set(u, CURLUPART_USER, NULL, 0);
    curl.url_set(u, CURLUPART_PASSWORD, NULL, 0);
    curl.url_set(u, CURLUPART_OPTIONS, NULL, 0);
    curl.url_get(u, CURLUPART_URL, &clean, 0);
  }
  lua_pushstring(co, clean ? clean : r->where);
  curl.free(clean);
  curl.url_cleanup(u);
}

static int has_secret(request *r, const char *text) {
  for (size_t i = 0; i < r->nsecrets; i++)
    if (strstr(text, r->secrets[i])) return 1;
  return 0;
}

static void push_failure(lua_State *co, request *r, const char *code, const char *detail) {
  lua_pushnil(co);
  lua_pushfstring(co, "%s: %s %s: %s", code, r->method, r->where, detail);
  lua_pushstring(co, code);
}

static const char *code_for(CURLcode rc, long os_errno) {
  switch (rc) {
    case CURLE_OPERATION_TIMEDOUT: return "timeout";
    case CURLE_COULDNT_CONNECT: return os_errno == ECONNREFUSED || os_errno == 0 ? "ECONNREFUSED" : "EIO";
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY: return "dns";
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CIPHER:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_ENGINE_NOTFOUND:
    case CURLE_SSL_ENGINE_SETFAILED:
    case CURLE_SSL_ENGINE_INITFAILED:
    case CURLE_SSL_SHUTDOWN_FAILED:
    case CURLE_SSL_CRL_BADFILE:
    case CURLE_SSL_ISSUER_ERROR:
    case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
    case CURLE_SSL_INVALIDCERTSTATUS:
    case CURLE_SSL_CLIENTCERT: return "tls";
    case CURLE_UNSUPPORTED_PROTOCOL:
    case CURLE_URL_MALFORMAT:
    case CURLE_TOO_MANY_REDIRECTS: return "EPROTO";
    default: return "EIO";
  }
}

/* Pushes the failure for a transfer that did not end with CURLE_OK. */
static void push_curl_failure(lua_State *co, request *r, CURLcode rc) {
  if (r->too_large) {
    lua_pushnil(co);
    lua_pushfstring(co, "too_large: %s %s: response body over %I bytes", r->method, r->where,
                    (lua_Integer)r->max_body);
    lua_pushliteral(co, "too_large");
    return;
  }
  if (r->headers_too_large) {
    push_failure(co, r, "too_large", "response headers over 1 MiB");
    return;
  }
  if (r->oom) {
    push_failure(co, r, "EIO", "out of memory");
    return;
  }
  if (r->out_errno) {
    lua_pushnil(co);
    lua_pushfstring(co, "%s: %s %s: cannot write %s: %s", uv_err_name(-r->out_errno), r->method, r->where,
                    r->part, strerror(r->out_errno));
    lua_pushstring(co, uv_err_name(-r->out_errno));
    return;
  }
  long os_errno = 0;
  curl.easy_getinfo(r->easy, CURLINFO_OS_ERRNO, &os_errno);
  const char *detail = r->errbuf[0] && !has_secret(r, r->errbuf) ? r->errbuf : curl.easy_strerror(rc);
  push_failure(co, r, code_for(rc, os_errno), detail);
}

/* Completes the request's task with its outcome, and frees the request. */
static void finish(request *r, CURLcode rc) {
  inflight_unlink(r);
  lua_State *co = ops_wait_thread(&r->w);
  if (co == NULL) {
    discard_output(r);
    request_free(r);
    return;
  }
  lua_checkstack(co, 8);
  if (rc != CURLE_OK) {
    discard_output(r);
    push_curl_failure(co, r, rc);
    ops_wait_complete(&r->w, 3);
    request_free(r);
    return;
  }
  int saved = 0;
  if (r->out_fd >= 0) {
    int ok = status_is_success(r);
    int e = close(r->out_fd) != 0 ? errno : 0;
    r->out_fd = -1;
    if (ok && e == 0 && rename(r->part, r->output) != 0) e = errno;
    if (!ok || e) unlink(r->part);
    r->part_created = 0;
    if (e) {
      lua_pushnil(co);
      lua_pushfstring(co, "%s: %s %s: cannot save %s: %s", uv_err_name(-e), r->method, r->where, r->output,
                      strerror(e));
      lua_pushstring(co, uv_err_name(-e));
      ops_wait_complete(&r->w, 3);
      request_free(r);
      return;
    }
    saved = ok;
  }
  long status = 0;
  curl.easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &status);
  lua_createtable(co, 0, 5);
  lua_pushinteger(co, status);
  lua_setfield(co, -2, "status");
  push_headers(co, r);
  lua_setfield(co, -2, "headers");
  if (!saved) {
    lua_pushlstring(co, r->body.data ? r->body.data : "", r->body.len);
    lua_setfield(co, -2, "body");
  }
  push_effective_url(co, r);
  lua_setfield(co, -2, "url");
  lua_pushnumber(co, (double)(uv_hrtime() - r->start) / 1e9);
  lua_setfield(co, -2, "duration");
  ops_wait_complete(&r->w, 1);
  request_free(r);
}

/* ---- reading the options ---- */

static int guard_gc(lua_State *L) {
  guard *g = luaL_checkudata(L, 1, GUARD_MT);
  if (g->r) {
    discard_output(g->r);
    request_free(g->r);
  }
  g->r = NULL;
  return 0;
}

/* response.headers[name] -> value | nil : the lookup lowercases name */
static int headers_index(lua_State *L) {
  if (lua_type(L, 2) != LUA_TSTRING) return 0;
  size_t n;
  const char *k = lua_tolstring(L, 2, &n);
  luaL_Buffer b;
  char *d = luaL_buffinitsize(L, &b, n);
  for (size_t i = 0; i < n; i++) d[i] = (char)(k[i] >= 'A' && k[i] <= 'Z' ? k[i] + 32 : k[i]);
  luaL_pushresultsize(&b, n);
  lua_rawget(L, 1);
  return 1;
}

static void add_secret(lua_State *L, request *r, const char *s) {
  if (s == NULL || *s == '\0') return;
  char **v = realloc(r->secrets, (r->nsecrets + 1) * sizeof *v);
  if (v == NULL) luaL_error(L, "out of memory");
  r->secrets = v;
  if ((v[r->nsecrets] = strdup(s)) == NULL) luaL_error(L, "out of memory");
  r->nsecrets++;
}

static void add_header(lua_State *L, request *r, const char *line) {
  struct curl_slist *l = curl.slist_append(r->headers, line);
  if (l == NULL) luaL_error(L, "out of memory");
  r->headers = l;
}

static int is_token(const char *s, size_t n) {
  if (n == 0) return 0;
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c <= ' ' || c >= 127 || strchr("\"(),/:;<=>?@[\\]{}", c)) return 0;
  }
  return 1;
}

static int is_header_text(const char *s, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (s[i] == '\r' || s[i] == '\n' || s[i] == '\0') return 0;
  return 1;
}

static int is_credential_header(const char *name, size_t n) {
  static const char *const names[] = {"authorization", "proxy-authorization", "cookie"};
  for (size_t i = 0; i < sizeof names / sizeof *names; i++)
    if (strlen(names[i]) == n && strncasecmp(name, names[i], n) == 0) return 1;
  return 0;
}

/* An Authorization-like value: secret as a whole, and its last word (the token). */
static void add_credential(lua_State *L, request *r, const char *v) {
  while (*v == ' ' || *v == '\t') v++;
  add_secret(L, r, v);
  const char *sp = strrchr(v, ' ');
  if (sp) add_secret(L, r, sp + 1);
}

/* opts.headers: {Name = value, ...} and/or {"Name: value", ...}; value false drops a header
 * libcurl would send. */
static void read_headers(lua_State *L, int opts, request *r, int *has_expect) {
  if (lua_getfield(L, opts, "headers") == LUA_TNIL) {
    lua_pop(L, 1);
    return;
  }
  if (!lua_istable(L, -1)) luaL_argerror(L, 1, "opts.headers must be a table");
  int t = lua_gettop(L);
  lua_pushnil(L);
  while (lua_next(L, t)) {
    size_t nn, vn;
    if (lua_type(L, -2) == LUA_TNUMBER) {
      if (lua_type(L, -1) != LUA_TSTRING) luaL_argerror(L, 1, "opts.headers: list entries must be \"Name: value\" strings");
      const char *line = lua_tolstring(L, -1, &vn);
      const char *colon = memchr(line, ':', vn);
      if (colon == NULL || !is_token(line, (size_t)(colon - line)) || !is_header_text(line, vn))
        luaL_argerror(L, 1, lua_pushfstring(L, "opts.headers: bad header line '%s' (expected \"Name: value\")", line));
      if (is_credential_header(line, (size_t)(colon - line))) add_credential(L, r, colon + 1);
      if ((size_t)(colon - line) == 6 && strncasecmp(line, "expect", 6) == 0) *has_expect = 1;
      add_header(L, r, line);
    } else if (lua_type(L, -2) == LUA_TSTRING) {
      const char *name = lua_tolstring(L, -2, &nn);
      if (!is_token(name, nn)) luaL_argerror(L, 1, lua_pushfstring(L, "opts.headers: bad header name '%s'", name));
      if (nn == 6 && strncasecmp(name, "expect", 6) == 0) *has_expect = 1;
      if (lua_type(L, -1) == LUA_TBOOLEAN && !lua_toboolean(L, -1)) {
        lua_pushfstring(L, "%s:", name);
      } else {
        if (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER)
          luaL_argerror(L, 1, lua_pushfstring(L, "opts.headers.%s must be a string (or false to drop it)", name));
        const char *v = lua_tolstring(L, -1, &vn); /* converts the stack slot, not the table */
        if (!is_header_text(v, vn))
          luaL_argerror(L, 1, lua_pushfstring(L, "opts.headers.%s contains a line break or NUL", name));
        if (is_credential_header(name, nn)) add_credential(L, r, v);
        if (vn == 0)
          lua_pushfstring(L, "%s;", name); /* libcurl's way to send an empty header */
        else
          lua_pushfstring(L, "%s: %s", name, v);
      }
      add_header(L, r, lua_tostring(L, -1));
      lua_pop(L, 1);
    } else {
      luaL_argerror(L, 1, "opts.headers keys must be header names or list indexes");
    }
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
}

/* opts[key]: a string without NUL bytes (anchored by the options table), or NULL. */
static const char *opt_string(lua_State *L, int opts, const char *key) {
  int t = lua_getfield(L, opts, key);
  if (t == LUA_TNIL) {
    lua_pop(L, 1);
    return NULL;
  }
  if (t != LUA_TSTRING) luaL_argerror(L, 1, lua_pushfstring(L, "opts.%s must be a string", key));
  size_t n;
  const char *s = lua_tolstring(L, -1, &n);
  if (strlen(s) != n) luaL_argerror(L, 1, lua_pushfstring(L, "opts.%s contains a NUL byte", key));
  lua_pop(L, 1);
  return s;
}

/* opts[key]: a number >= 0 (what names its unit, for the error), or dflt. */
static double opt_amount(lua_State *L, int opts, const char *key, const char *what, double dflt) {
  int t = lua_getfield(L, opts, key);
  double v = dflt;
  if (t != LUA_TNIL) {
    if (t != LUA_TNUMBER) luaL_argerror(L, 1, lua_pushfstring(L, "opts.%s must be a number of %s", key, what));
    v = lua_tonumber(L, -1);
    if (!(v >= 0)) luaL_argerror(L, 1, lua_pushfstring(L, "opts.%s must be >= 0", key));
  }
  lua_pop(L, 1);
  return v;
}

static long to_ms(double s) { return s * 1000.0 > 2e9 ? 0 : (long)(s * 1000.0 + 0.5); }

/* Parses the URL: keeps "scheme://host:port/path" for messages, and its userinfo and query
 * as secrets. Returns NULL, or what is wrong with it (reported as EPROTO). */
static const char *read_url(lua_State *L, request *r, const char *url) {
  add_secret(L, r, url);
  CURLU *u = curl.url();
  if (u == NULL) luaL_error(L, "out of memory");
  enum { SCHEME, HOST, PORT, PATH, USER, PASSWORD, QUERY, NPARTS };
  static const CURLUPart parts[NPARTS] = {CURLUPART_SCHEME, CURLUPART_HOST,     CURLUPART_PORT, CURLUPART_PATH,
                                          CURLUPART_USER,   CURLUPART_PASSWORD, CURLUPART_QUERY};
  char *v[NPARTS] = {0};
  const char *problem = NULL;
  int oom = 0;
  CURLUcode uc = curl.url_set(u, CURLUPART_URL, url, CURLU_NON_SUPPORT_SCHEME);
  if (uc != CURLUE_OK) {
    problem = curl.url_strerror(uc);
    r->where = strdup("<invalid URL>");
  } else {
    for (int i = 0; i < NPARTS; i++)
      curl.url_get(u, parts[i], &v[i], i == PORT ? CURLU_DEFAULT_PORT : (i == USER || i == PASSWORD) ? CURLU_URLDECODE : 0);
    if (v[SCHEME] == NULL || (strcmp(v[SCHEME], "http") != 0 && strcmp(v[SCHEME], "https") != 0)) {
      problem = "only http and https URLs are allowed";
      for (int i = HOST; i <= PATH; i++) curl.free(v[i]), v[i] = NULL; /* "file://" names no port */
    }
    size_t n = 8;
    for (int i = SCHEME; i <= PATH; i++) n += v[i] ? strlen(v[i]) : 0;
    if ((r->where = malloc(n)) != NULL)
      snprintf(r->where, n, "%s://%s%s%s%s", v[SCHEME] ? v[SCHEME] : "", v[HOST] ? v[HOST] : "", v[PORT] ? ":" : "",
               v[PORT] ? v[PORT] : "", v[PATH] ? v[PATH] : "");
    for (int i = USER; i <= QUERY; i++) {
      if (v[i] == NULL || *v[i] == '\0') continue;
      char **s = realloc(r->secrets, (r->nsecrets + 1) * sizeof *s);
      if (s == NULL || (s[r->nsecrets] = strdup(v[i])) == NULL) {
        if (s) r->secrets = s;
        oom = 1;
        break;
      }
      r->secrets = s;
      r->nsecrets++;
    }
  }
  for (int i = 0; i < NPARTS; i++) curl.free(v[i]);
  curl.url_cleanup(u);
  if (oom || r->where == NULL) luaL_error(L, "out of memory");
  return problem;
}

/* Before the transfer starts: returns nil, message, code and frees the request at once. */
static int fail_now(lua_State *L, guard *g, const char *code, const char *detail) {
  request *r = g->r;
  lua_pushnil(L);
  lua_pushfstring(L, "%s: %s %s: %s", code, r->method, r->where, detail);
  lua_pushstring(L, code);
  g->r = NULL;
  discard_output(r);
  request_free(r);
  return 3;
}

static int fail_errno(lua_State *L, guard *g, int e, const char *what, const char *path) {
  lua_pushfstring(L, "cannot %s %s: %s", what, path, strerror(e));
  return fail_now(L, g, uv_err_name(-e), lua_tostring(L, -1));
}

#define SETOPT(opt, val)                                                                     \
  do {                                                                                       \
    if (curl.easy_setopt(easy, opt, val) != CURLE_OK) return luaL_error(L, "http: libcurl refused " #opt); \
  } while (0)

/* http_client.request(opts) -> response | nil, err, code */
static int l_request(lua_State *L) {
  ops_check_task(L, "http.request");
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  if (!curl_load()) {
    lua_pushnil(L);
    lua_pushfstring(L, "libcurl is not available: %s", curl_load_error);
    lua_pushliteral(L, "ENOSYS");
    return 3;
  }
  multi_start(L);

  guard *g = lua_newuserdatauv(L, sizeof *g, 0); /* 2 */
  g->r = NULL;
  luaL_setmetatable(L, GUARD_MT);
  request *r = calloc(1, sizeof *r);
  if (r == NULL) return luaL_error(L, "out of memory");
  r->body_ref = LUA_NOREF;
  r->out_fd = -1;
  g->r = r;

  const char *method = opt_string(L, 1, "method");
  if (method == NULL) method = "GET";
  if (!is_token(method, strlen(method))) return luaL_argerror(L, 1, "opts.method must be an HTTP method name");
  if ((r->method = strdup(method)) == NULL) return luaL_error(L, "out of memory");
  const char *url = opt_string(L, 1, "url");
  if (url == NULL) return luaL_argerror(L, 1, "opts.url is required");
  const char *url_problem = read_url(L, r, url);

  double timeout = opt_amount(L, 1, "timeout", "seconds", DEFAULT_TIMEOUT);
  double connect_timeout = opt_amount(L, 1, "connect_timeout", "seconds", DEFAULT_CONNECT_TIMEOUT);
  double max_body = opt_amount(L, 1, "max_body", "bytes", DEFAULT_MAX_BODY);
  r->max_body = max_body >= (double)SIZE_MAX ? SIZE_MAX : (size_t)max_body;
  lua_getfield(L, 1, "follow_redirects");
  int follow = lua_toboolean(L, -1);
  lua_getfield(L, 1, "tls_verify");
  int verify = lua_isnil(L, -1) || lua_toboolean(L, -1);
  lua_pop(L, 2);
  const char *ca_file = opt_string(L, 1, "ca_file");
  const char *user_agent = opt_string(L, 1, "user_agent");
  const char *bearer = opt_string(L, 1, "bearer");
  const char *output = opt_string(L, 1, "output");
  const char *body_file = opt_string(L, 1, "body_file");
  const char *basic_user = NULL, *basic_pass = NULL;
  int t = lua_getfield(L, 1, "basic"); /* 3: anchors the two strings */
  if (t != LUA_TNIL) {
    if (t != LUA_TTABLE) return luaL_argerror(L, 1, "opts.basic must be {user, password}");
    if (lua_getfield(L, 3, "user") == LUA_TNIL) {
      lua_pop(L, 1);
      lua_rawgeti(L, 3, 1);
    }
    if (lua_getfield(L, 3, "password") == LUA_TNIL) {
      lua_pop(L, 1);
      lua_rawgeti(L, 3, 2);
    }
    if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TSTRING)
      return luaL_argerror(L, 1, "opts.basic must be {user, password} (two strings)");
    basic_user = lua_tostring(L, -2);
    basic_pass = lua_tostring(L, -1);
    lua_pop(L, 2);
  }
  t = lua_getfield(L, 1, "body");
  if (t != LUA_TNIL && t != LUA_TSTRING) return luaL_argerror(L, 1, "opts.body must be a string");
  if (t == LUA_TSTRING && body_file) return luaL_argerror(L, 1, "give opts.body or opts.body_file, not both");
  size_t body_len = 0;
  const char *body = t == LUA_TSTRING ? lua_tolstring(L, -1, &body_len) : NULL;
  if (body) r->body_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  else lua_pop(L, 1);
  add_secret(L, r, basic_user);
  add_secret(L, r, basic_pass);
  add_secret(L, r, bearer);
  int has_expect = 0;
  read_headers(L, 1, r, &has_expect);

  if (url_problem) return fail_now(L, g, "EPROTO", url_problem);

  if (body_file) {
    r->body_file = fopen(body_file, "rbe");
    if (r->body_file == NULL) return fail_errno(L, g, errno, "read", body_file);
  }
  if (output) {
    r->output = strdup(output);
    r->part = malloc(strlen(output) + 6);
    if (r->output == NULL || r->part == NULL) return luaL_error(L, "out of memory");
    strcpy(r->part, output);
    strcat(r->part, ".part");
    r->out_fd = open(r->part, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
    if (r->out_fd < 0) return fail_errno(L, g, errno, "write", r->part);
    r->part_created = 1;
  }

  CURL *easy = r->easy = curl.easy_init();
  if (easy == NULL) return luaL_error(L, "http: cannot make a libcurl handle");
  SETOPT(CURLOPT_PRIVATE, (char *)r);
  SETOPT(CURLOPT_ERRORBUFFER, r->errbuf);
  SETOPT(CURLOPT_NOSIGNAL, 1L);
  SETOPT(CURLOPT_URL, url);
  SETOPT(CURLOPT_PROTOCOLS_STR, "http,https");
  SETOPT(CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
  SETOPT(CURLOPT_FOLLOWLOCATION, follow ? 1L : 0L);
  SETOPT(CURLOPT_MAXREDIRS, MAX_REDIRECTS);
  SETOPT(CURLOPT_TIMEOUT_MS, to_ms(timeout));
  SETOPT(CURLOPT_CONNECTTIMEOUT_MS, to_ms(connect_timeout));
  SETOPT(CURLOPT_SSL_VERIFYPEER, verify ? 1L : 0L);
  SETOPT(CURLOPT_SSL_VERIFYHOST, verify ? 2L : 0L);
  if (ca_file) SETOPT(CURLOPT_CAINFO, ca_file);
  SETOPT(CURLOPT_USERAGENT, user_agent ? user_agent : DEFAULT_USER_AGENT);
  SETOPT(CURLOPT_BUFFERSIZE, 256L * 1024); /* fewer, larger writes for big downloads */
  SETOPT(CURLOPT_WRITEFUNCTION, on_body);
  SETOPT(CURLOPT_WRITEDATA, r);
  SETOPT(CURLOPT_HEADERFUNCTION, on_header);
  SETOPT(CURLOPT_HEADERDATA, r);
  if (basic_user) {
    SETOPT(CURLOPT_HTTPAUTH, (long)CURLAUTH_BASIC);
    SETOPT(CURLOPT_USERNAME, basic_user);
    SETOPT(CURLOPT_PASSWORD, basic_pass);
  }
  if (bearer) {
    SETOPT(CURLOPT_HTTPAUTH, (long)CURLAUTH_BEARER);
    SETOPT(CURLOPT_XOAUTH2_BEARER, bearer);
  }

  int is_get = strcmp(method, "GET") == 0, is_head = strcmp(method, "HEAD") == 0;
  int is_post = strcmp(method, "POST") == 0;
  if (body || r->body_file) {
    curl_off_t size = (curl_off_t)body_len;
    if (r->body_file) {
      struct stat st;
      size = fstat(fileno(r->body_file), &st) == 0 && S_ISREG(st.st_mode) ? (curl_off_t)st.st_size : -1;
    }
    if (is_post || body) {
      SETOPT(CURLOPT_POST, 1L);
      SETOPT(CURLOPT_POSTFIELDSIZE_LARGE, size);
      if (body)
        SETOPT(CURLOPT_POSTFIELDS, body);
      else
        SETOPT(CURLOPT_READDATA, r->body_file);
    } else {
      SETOPT(CURLOPT_UPLOAD, 1L);
      SETOPT(CURLOPT_INFILESIZE_LARGE, size);
      SETOPT(CURLOPT_READDATA, r->body_file);
    }
    if (!is_post) SETOPT(CURLOPT_CUSTOMREQUEST, method);
    /* a server that never answers "100 Continue" would cost a second per upload */
    if (!has_expect) add_header(L, r, "Expect:");
  } else if (is_head) {
    SETOPT(CURLOPT_NOBODY, 1L);
  } else if (!is_get) {
    SETOPT(CURLOPT_CUSTOMREQUEST, method);
  }
  if (r->headers) SETOPT(CURLOPT_HTTPHEADER, r->headers);

  r->start = uv_hrtime();
  if (curl.multi_add_handle(multi, easy) != CURLM_OK) return fail_now(L, g, "EIO", "libcurl refused the transfer");
  g->r = NULL; /* the multi owns it now */
  if (inflight == NULL) set_loop_ref(1);
  inflight_link(r);
  r->w.cancel = request_cancel;
  lua_settop(L, 0);
  return ops_wait_begin(L, &r->w, to_ms(timeout) > 0 ? timeout + WAIT_MARGIN : -1);
}

int luaopen_ops_core_http_client(lua_State *L) {
  static const luaL_Reg funcs[] = {{"request", l_request}, {NULL, NULL}};
  if (luaL_newmetatable(L, GUARD_MT)) {
    lua_pushcfunction(L, guard_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  if (luaL_newmetatable(L, HEADERS_MT)) {
    lua_pushcfunction(L, headers_index);
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
  if (luaL_newmetatable(L, SHUTDOWN_MT)) {
    lua_pushcfunction(L, shutdown_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  /* closes the transfers and connections when the state closes, before the loop does */
  lua_newuserdatauv(L, 1, 0);
  luaL_setmetatable(L, SHUTDOWN_MT);
  lua_setfield(L, LUA_REGISTRYINDEX, "ops.http_client.shutdown");
  luaL_newlib(L, funcs);
  return 1;
}
