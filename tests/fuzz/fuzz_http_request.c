/* fuzz_http_request.c: libFuzzer target for the server's request path.
 *
 * Arbitrary bytes go the way a request goes through the server: the header-end scan the
 * timeout sweep runs on a connection's buffer (fed in two pieces, as reads arrive), then
 * picohttpparser as h2o 2.2 runs it (h2o's copy, with h2o's header count and size caps,
 * names lower-cased in place as h2o does), h2o's chunked decoder with the body limit, and
 * then our own code: the limit check (431/413) and building the Lua request table.
 * The server's functions are static, so this file includes http_server.c.
 */
#include "../../runtime/http_server.c"

#include <assert.h>
#include <ctype.h>
#include <lualib.h>

/* picohttpparser, as libh2o 2.2 bundles and exports it (its header is not installed) */
struct phr_header {
  const char *name;
  size_t name_len;
  const char *value;
  size_t value_len;
};
struct phr_chunked_decoder {
  size_t bytes_left_in_chunk;
  char consume_trailer;
  char _hex_count;
  char _state;
};
int phr_parse_request(const char *buf, size_t len, const char **method, size_t *method_len, const char **path,
                      size_t *path_len, int *minor_version, struct phr_header *headers, size_t *num_headers,
                      size_t last_len);
ssize_t phr_decode_chunked(struct phr_chunked_decoder *decoder, char *buf, size_t *bufsz);

static const http_limits limits = {4096, 2048}; /* max_body, max_header: small, so fuzzing reaches them */

static int is_name(const struct phr_header *h, const char *name) {
  return h->name_len == strlen(name) && memcmp(h->name, name, h->name_len) == 0;
}

static int build(lua_State *L) {
  push_request(L, lua_touserdata(L, 1));
  return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static lua_State *L;
  if (L == NULL) L = luaL_newstate();
  char *buf = malloc(size + 1); /* exact size: ASan sees any read past the end */
  if (buf == NULL) return 0;
  memcpy(buf, data, size);

  /* the sweep's scan, in one go and in two reads, must agree */
  size_t scanned = 0, split = size / 2, scanned2 = 0;
  size_t end_once = scan_header_end(buf, size, &scanned);
  size_t end_twice = scan_header_end(buf, split, &scanned2);
  if (end_twice == 0) end_twice = scan_header_end(buf, size, &scanned2);
  assert(end_once == end_twice);
  assert(end_once <= size);

  const char *method, *path;
  size_t method_len, path_len, nh = H2O_MAX_HEADERS;
  int minor;
  struct phr_header hs[H2O_MAX_HEADERS];
  size_t inlen = size < H2O_MAX_REQLEN ? size : H2O_MAX_REQLEN;
  int reqlen = phr_parse_request(buf, inlen, &method, &method_len, &path, &path_len, &minor, hs, &nh, 0);
  if (reqlen < 0) goto out;

  http_header headers[H2O_MAX_HEADERS];
  http_request r;
  memset(&r, 0, sizeof r);
  r.method = method;
  r.method_len = method_len;
  r.target = path;
  r.target_len = path_len;
  r.remote = "127.0.0.1:1";
  int chunked = 0;
  size_t content_length = 0;
  for (size_t i = 0; i < nh; i++) {
    if (hs[i].name == NULL) continue; /* a folded continuation line */
    for (size_t j = 0; j < hs[i].name_len; j++) ((char *)hs[i].name)[j] = (char)tolower((unsigned char)hs[i].name[j]);
    if (is_name(&hs[i], "host")) {
      r.authority = hs[i].value;
      r.authority_len = hs[i].value_len;
    } else if (is_name(&hs[i], "transfer-encoding")) {
      chunked = 1;
    } else if (is_name(&hs[i], "content-length")) {
      r.has_body = 1;
      content_length = 0;
      for (size_t j = 0; j < hs[i].value_len && content_length <= limits.max_body; j++)
        content_length = content_length * 10 + (size_t)(hs[i].value[j] & 0x0f);
    } else {
      headers[r.nheaders].name = hs[i].name;
      headers[r.nheaders].name_len = hs[i].name_len;
      headers[r.nheaders].value = hs[i].value;
      headers[r.nheaders].value_len = hs[i].value_len;
      r.nheaders++;
    }
  }
  r.headers = headers;
  char *body = buf + reqlen;
  size_t avail = size - (size_t)reqlen;
  if (chunked) {
    struct phr_chunked_decoder dec;
    memset(&dec, 0, sizeof dec);
    dec.consume_trailer = 1;
    size_t n = avail;
    ssize_t rc = phr_decode_chunked(&dec, body, &n);
    if (rc == -1) goto out; /* 400 */
    if (n > limits.max_body) goto out; /* 413 while reading */
    if (rc == -2) goto out;            /* incomplete: more to read */
    r.has_body = 1;
    r.body = body;
    r.body_len = n;
  } else if (r.has_body) {
    if (content_length > limits.max_body) goto out; /* 413 before reading */
    if (avail < content_length) goto out;
    r.body = body;
    r.body_len = content_length;
  }
  if (request_check_limits(&r, &limits) != 0) goto out;

  lua_settop(L, 0);
  lua_pushcfunction(L, build);
  lua_pushlightuserdata(L, &r);
  if (lua_pcall(L, 1, 1, 0) == LUA_OK) {
    lua_getfield(L, -1, "path");
    size_t plen;
    lua_tolstring(L, -1, &plen);
    lua_getfield(L, -2, "raw_path");
    assert(plen <= lua_rawlen(L, -1)); /* decoding never grows the path */
    lua_getfield(L, -3, "body");
    assert(lua_rawlen(L, -1) == r.body_len);
  }
  lua_settop(L, 0);
  lua_gc(L, LUA_GCCOLLECT);
out:
  free(buf);
  return 0;
}
