/* modules.c: where `require` finds Lua modules.
 *
 * Order: package.preload; the override folders (the repo's .opsrun/, then OPSRUN_PATH);
 * the modules embedded in the binary (or, with OPSRUN_LUA_DIR, the source tree they were
 * built from); then Lua's own package.path and package.cpath searchers.
 */
#include "opsrun.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define OVERRIDES_KEY "opsrun.override_dirs"
#define SHADOWED_KEY "opsrun.shadowed"

const ops_embedded *ops_embedded_find(const char *name) {
  size_t lo = 0, hi = ops_embedded_count;
  while (lo < hi) { /* the generator emits the table sorted by name */
    size_t mid = (lo + hi) / 2;
    int c = strcmp(name, ops_embedded_modules[mid].name);
    if (c == 0) return &ops_embedded_modules[mid];
    if (c < 0)
      hi = mid;
    else
      lo = mid + 1;
  }
  return NULL;
}

int ops_module_relpath(const char *name, char *buf, size_t buflen) {
  size_t n = strlen(name);
  if (n == 0 || n >= buflen || name[0] == '.' || name[n - 1] == '.') return -1;
  for (size_t i = 0; i < n; i++) {
    char c = name[i];
    if (c == '/' || c == '\\' || c == '\0') return -1;
    if (c == '.' && name[i + 1] == '.') return -1; /* empty segment, or a ".." */
    buf[i] = c == '.' ? '/' : c;
  }
  buf[n] = '\0';
  return 0;
}

static int is_file(const char *path) {
  struct stat st;
  return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* Finds name under dir as rel.lua or rel/init.lua; pushes the path on success. */
static int find_in_dir(lua_State *L, const char *dir, const char *rel) {
  lua_pushfstring(L, "%s/%s.lua", dir, rel);
  if (is_file(lua_tostring(L, -1))) return 1;
  lua_pop(L, 1);
  lua_pushfstring(L, "%s/%s/init.lua", dir, rel);
  if (is_file(lua_tostring(L, -1))) return 1;
  lua_pop(L, 1);
  return 0;
}

/* With OPSRUN_LUA_DIR set, the source file a built-in comes from; pushes it. */
static int find_in_source_tree(lua_State *L, const char *name) {
  const char *dir = getenv("OPSRUN_LUA_DIR");
  if (dir == NULL || *dir == '\0') return 0;
  const ops_embedded *e = ops_embedded_find(name);
  if (e == NULL) return 0;
  /* chunk is "@builtin/<path under lua/>" */
  lua_pushfstring(L, "%s/%s", dir, e->chunk + strlen("@builtin/"));
  if (is_file(lua_tostring(L, -1))) return 1;
  lua_pop(L, 1);
  return 0;
}

static int load_file_module(lua_State *L, const char *name, const char *path) {
  if (luaL_loadfilex(L, path, "t") != LUA_OK)
    return luaL_error(L, "error loading module '%s' from file '%s':\n\t%s", name, path, lua_tostring(L, -1));
  lua_pushstring(L, path);
  return 2;
}

/* Loads the built-in module; pushes loader and its location. Returns 0 when absent. */
static int load_builtin(lua_State *L, const char *name) {
  if (find_in_source_tree(L, name)) {
    const char *path = lua_tostring(L, -1);
    int n = load_file_module(L, name, path);
    lua_remove(L, -3);
    return n;
  }
  const ops_embedded *e = ops_embedded_find(name);
  if (e == NULL) return 0;
  if (luaL_loadbufferx(L, e->src, e->len, e->chunk, "b") != LUA_OK) /* precompiled by embed */
    return luaL_error(L, "error loading built-in module '%s':\n\t%s", name, lua_tostring(L, -1));
  lua_pushstring(L, e->chunk + 1);
  return 2;
}

static void note_shadow(lua_State *L, const char *name, const char *path) {
  lua_getfield(L, LUA_REGISTRYINDEX, SHADOWED_KEY);
  if (lua_getfield(L, -1, name) != LUA_TNIL) {
    lua_pop(L, 2);
    return;
  }
  lua_pop(L, 1);
  lua_pushboolean(L, 1);
  lua_setfield(L, -2, name);
  /* the Lua layer may set a reporter (ops.log); otherwise stderr */
  if (lua_getfield(L, -1, "__report") == LUA_TFUNCTION) {
    lua_pushstring(L, name);
    lua_pushstring(L, path);
    if (lua_pcall(L, 2, 0, 0) != LUA_OK) lua_pop(L, 1);
  } else {
    lua_pop(L, 1);
    fprintf(stderr, "opsrun: module '%s' comes from %s (it shadows the built-in)\n", name, path);
  }
  lua_pop(L, 1);
}

static int override_searcher(lua_State *L) {
  const char *name = luaL_checkstring(L, 1);
  char rel[512];
  if (ops_module_relpath(name, rel, sizeof rel) != 0) {
    lua_pushfstring(L, "\n\tno override for '%s' (not a safe module name)", name);
    return 1;
  }
  lua_getfield(L, LUA_REGISTRYINDEX, OVERRIDES_KEY);
  int n = (int)luaL_len(L, -1);
  for (int i = 1; i <= n; i++) {
    lua_rawgeti(L, -1, i);
    const char *dir = lua_tostring(L, -1);
    if (dir && find_in_dir(L, dir, rel)) {
      const char *path = lua_tostring(L, -1);
      if (ops_embedded_find(name)) note_shadow(L, name, path);
      return load_file_module(L, name, path);
    }
    lua_pop(L, 1);
  }
  lua_pushfstring(L, "\n\tno override '%s' in the repo's .opsrun/ or OPSRUN_PATH", rel);
  return 1;
}

static int builtin_searcher(lua_State *L) {
  const char *name = luaL_checkstring(L, 1);
  int n = load_builtin(L, name);
  if (n) return n;
  lua_pushfstring(L, "\n\tno built-in module '%s'", name);
  return 1;
}

/* modules.set_override_dirs({dir, ...}) */
static int l_set_override_dirs(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_newtable(L);
  int n = (int)luaL_len(L, 1);
  for (int i = 1; i <= n; i++) {
    lua_rawgeti(L, 1, i);
    if (lua_type(L, -1) != LUA_TSTRING) return luaL_argerror(L, 1, "directories must be strings");
    lua_rawseti(L, -2, i);
  }
  lua_setfield(L, LUA_REGISTRYINDEX, OVERRIDES_KEY);
  return 0;
}

/* modules.override_dirs() -> {dir, ...} */
static int l_override_dirs(lua_State *L) {
  lua_getfield(L, LUA_REGISTRYINDEX, OVERRIDES_KEY);
  return 1;
}

/* modules.set_reporter(fn(name, path)) : how a shadowed built-in is reported */
static int l_set_reporter(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_getfield(L, LUA_REGISTRYINDEX, SHADOWED_KEY);
  lua_pushvalue(L, 1);
  lua_setfield(L, -2, "__report");
  return 0;
}

/* modules.locate(name) -> kind, where | nil : kind is "preload"|"override"|"builtin"|"path" */
static int l_locate(lua_State *L) {
  const char *name = luaL_checkstring(L, 1);
  char rel[512];
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "preload");
  if (lua_getfield(L, -1, name) != LUA_TNIL) {
    lua_pushliteral(L, "preload");
    lua_pushfstring(L, "compiled into opsrun (%s)", name);
    return 2;
  }
  lua_pop(L, 2);
  if (ops_module_relpath(name, rel, sizeof rel) == 0) {
    lua_getfield(L, LUA_REGISTRYINDEX, OVERRIDES_KEY);
    int n = (int)luaL_len(L, -1);
    for (int i = 1; i <= n; i++) {
      lua_rawgeti(L, -1, i);
      const char *dir = lua_tostring(L, -1);
      if (dir && find_in_dir(L, dir, rel)) {
        lua_pushliteral(L, "override");
        lua_insert(L, -2);
        return 2;
      }
      lua_pop(L, 1);
    }
    lua_pop(L, 1);
  }
  if (find_in_source_tree(L, name)) {
    lua_pushliteral(L, "builtin");
    lua_insert(L, -2);
    return 2;
  }
  const ops_embedded *e = ops_embedded_find(name);
  if (e) {
    lua_pushliteral(L, "builtin");
    lua_pushstring(L, e->chunk + 1);
    return 2;
  }
  /* package.searchpath over package.path, then package.cpath */
  const char *fields[] = {"path", "cpath"};
  for (int i = 0; i < 2; i++) {
    lua_getfield(L, -1, "searchpath");
    lua_pushstring(L, name);
    lua_getfield(L, -3, fields[i]);
    lua_call(L, 2, 1);
    if (!lua_isnil(L, -1)) {
      lua_pushliteral(L, "path");
      lua_insert(L, -2);
      return 2;
    }
    lua_pop(L, 1);
  }
  return 0;
}

/* modules.builtin(name) -> the built-in module, loaded once, even when overridden */
static int l_builtin(lua_State *L) {
  const char *name = luaL_checkstring(L, 1);
  lua_getfield(L, LUA_REGISTRYINDEX, "opsrun.builtin_loaded");
  if (lua_getfield(L, -1, name) != LUA_TNIL) return 1;
  lua_pop(L, 1);
  /* an unoverridden built-in already required is the same module */
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "loaded");
  lua_getfield(L, -1, name);
  lua_remove(L, -2);
  lua_remove(L, -2);
  int kind_ok = 0;
  if (!lua_isnil(L, -1)) {
    lua_pushcfunction(L, l_locate);
    lua_pushstring(L, name);
    lua_call(L, 1, 1);
    kind_ok = lua_isstring(L, -1) && strcmp(lua_tostring(L, -1), "builtin") == 0;
    lua_pop(L, 1);
  }
  if (kind_ok) {
    lua_pushvalue(L, -1);
    lua_setfield(L, -3, name);
    return 1;
  }
  lua_pop(L, 1);
  if (load_builtin(L, name) == 0) return luaL_error(L, "no built-in module '%s'", name);
  lua_pushstring(L, name);
  lua_insert(L, -2);
  lua_call(L, 2, 1);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    lua_pushboolean(L, 1);
  }
  lua_pushvalue(L, -1);
  lua_setfield(L, -3, name);
  return 1;
}

/* modules.list() -> sorted array of built-in module names */
static int l_list(lua_State *L) {
  lua_createtable(L, (int)ops_embedded_count, 0);
  for (size_t i = 0; i < ops_embedded_count; i++) {
    lua_pushstring(L, ops_embedded_modules[i].name);
    lua_rawseti(L, -2, (lua_Integer)i + 1);
  }
  return 1;
}

int luaopen_ops_core_modules(lua_State *L) {
  static const luaL_Reg funcs[] = {{"set_override_dirs", l_set_override_dirs},
                                   {"override_dirs", l_override_dirs},
                                   {"set_reporter", l_set_reporter},
                                   {"locate", l_locate},
                                   {"builtin", l_builtin},
                                   {"list", l_list},
                                   {NULL, NULL}};
  luaL_newlib(L, funcs);
  return 1;
}

static const luaL_Reg core_modules[] = {
    {"ops.core.sched", luaopen_ops_core_sched},   {"ops.core.proc", luaopen_ops_core_proc},
    {"ops.core.fs", luaopen_ops_core_fs},         {"ops.core.yaml", luaopen_ops_core_yaml},
    {"ops.core.time", luaopen_ops_core_time},     {"ops.core.sys", luaopen_ops_core_sys},
    {"ops.core.crypto", luaopen_ops_core_crypto}, {"ops.core.store", luaopen_ops_core_store},
    {"ops.core.http_client", luaopen_ops_core_http_client},
    {"ops.core.http_server", ops_open_http_server}, /* loads the embedded module (lazy.c) */
    {"ops.core.json_select", ops_open_json_select}, /* the same module */
    {"ops.core.modules", luaopen_ops_core_modules},
    {"cjson", luaopen_cjson},                     {NULL, NULL}};

void ops_modules_install(lua_State *L) {
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  for (const luaL_Reg *m = core_modules; m->name; m++) {
    lua_pushcfunction(L, m->func);
    lua_setfield(L, -2, m->name);
  }
  lua_pop(L, 1);
  lua_newtable(L);
  lua_setfield(L, LUA_REGISTRYINDEX, OVERRIDES_KEY);
  lua_newtable(L);
  lua_setfield(L, LUA_REGISTRYINDEX, SHADOWED_KEY);
  lua_newtable(L);
  lua_setfield(L, LUA_REGISTRYINDEX, "opsrun.builtin_loaded");
  /* package.searchers = {preload, override, builtin, lua path, c path, c root} */
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "searchers");
  int n = (int)luaL_len(L, -1);
  for (int i = n; i >= 2; i--) {
    lua_rawgeti(L, -1, i);
    lua_rawseti(L, -2, i + 2);
  }
  lua_pushcfunction(L, override_searcher);
  lua_rawseti(L, -2, 2);
  lua_pushcfunction(L, builtin_searcher);
  lua_rawseti(L, -2, 3);
  lua_pop(L, 2);
}
