/* lazy.c: ops.core.http_server and ops.core.json_select, loaded on first require.
 *
 * The HTTP server (http_server.c, linked with libh2o) and the JSON selector
 * (json_select.cpp, linked with libsimdjson and so libstdc++) are built as one shared
 * module, whose bytes are compiled into opsrun (build-aux/embed_blob.c). Linking libh2o into
 * opsrun itself loaded it, with libssl, libcrypto, zlib and wslay, at every start-up, HTTP
 * or not; now the first `require` of either writes the module to a memfd, dlopens it from
 * /proc/self/fd (the system loads libh2o and the rest then) and calls the luaopen asked
 * for. The installed opsrun is still one file.
 *
 * The module calls back into opsrun (ops_check_task, ops_wait_*, ops_loop, ops_pcall,
 * ops_main_state) and the Lua API: opsrun exports them (ENABLE_EXPORTS) and the module
 * takes liblua and libuv from the process, as a Lua C module would.
 */
#define _GNU_SOURCE

#include "opsrun.h"

#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

__attribute__((visibility("hidden"))) extern const unsigned char ops_http_server_module[];
__attribute__((visibility("hidden"))) extern const size_t ops_http_server_module_len;

static void *module; /* once loaded; never unloaded: its metatables' functions live in it */

/* Loads the module; returns NULL after writing why into err. */
static void *load_module(char *err, size_t errlen) {
  int fd = memfd_create("opsrun-http_server.so", MFD_CLOEXEC);
  if (fd < 0) {
    snprintf(err, errlen, "memfd_create: %s", strerror(errno));
    return NULL;
  }
  const unsigned char *p = ops_http_server_module;
  size_t left = ops_http_server_module_len;
  while (left > 0) {
    ssize_t n = write(fd, p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      snprintf(err, errlen, "writing the module to a memfd: %s", n < 0 ? strerror(errno) : "short write");
      close(fd);
      return NULL;
    }
    p += n;
    left -= (size_t)n;
  }
  char path[64];
  snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
  void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  close(fd); /* the mapping stays */
  if (lib == NULL) snprintf(err, errlen, "%s", dlerror());
  return lib;
}

/* Opens the module's part `name` (its luaopen_<symbol>), loading the module first. */
static int open_part(lua_State *L, const char *name, const char *symbol) {
  char err[1024];
  if (module == NULL && (module = load_module(err, sizeof err)) == NULL)
    return luaL_error(L, "%s: cannot load the server module: %s", name, err);
  lua_CFunction open;
  *(void **)&open = dlsym(module, symbol);
  if (open == NULL) return luaL_error(L, "%s: the server module has no %s", name, symbol);
  return open(L);
}

/* package.preload["ops.core.http_server"] */
int ops_open_http_server(lua_State *L) {
  return open_part(L, "ops.core.http_server", "luaopen_ops_core_http_server");
}

/* package.preload["ops.core.json_select"] */
int ops_open_json_select(lua_State *L) {
  return open_part(L, "ops.core.json_select", "luaopen_ops_core_json_select");
}
