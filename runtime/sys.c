/* sys.c: the process itself: environment, identity, terminals, signals.
 *
 * SIGINT and SIGTERM are always watched. With a Lua handler (sys.on_signal) the handler
 * runs in a new task. Without one, opsrun forwards the signal to every child's process
 * group, waits for them (a second signal, or 10 s, escalates to SIGKILL) and exits with
 * 128 + the signal number, so no child is left behind. */
#include "opsrun.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

extern char **environ;

#define HANDLERS_KEY "opsrun.signal_handlers"

static const struct {
  const char *name;
  int num;
} signals[] = {{"SIGINT", SIGINT},   {"SIGTERM", SIGTERM}, {"SIGHUP", SIGHUP},   {"SIGUSR1", SIGUSR1},
               {"SIGUSR2", SIGUSR2}, {"SIGQUIT", SIGQUIT}, {"SIGKILL", SIGKILL}, {"SIGCHLD", SIGCHLD},
               {"SIGPIPE", SIGPIPE}, {"SIGALRM", SIGALRM}, {"SIGSTOP", SIGSTOP}, {"SIGCONT", SIGCONT},
               {NULL, 0}};

static int signum_of(const char *name) {
  const char *n = strncmp(name, "SIG", 3) == 0 ? name + 3 : name;
  for (int i = 0; signals[i].name; i++)
    if (strcmp(signals[i].name + 3, n) == 0) return signals[i].num;
  return 0;
}

static const char *signame_of(int num) {
  for (int i = 0; signals[i].name; i++)
    if (signals[i].num == num) return signals[i].name;
  return "SIG?";
}

/* ---- signals ---- */

static uv_signal_t *watchers[65];
static uv_timer_t *exit_timer;
static int exit_code_pending;
static int exit_ticks;

static void exit_poll(uv_timer_t *t) {
  (void)t;
  if (ops_proc_count() == 0) {
    fflush(stdout);
    exit(exit_code_pending);
  }
  if (++exit_ticks == 200) ops_proc_signal_all(SIGKILL); /* 10 s */
}

static void default_action(int signum) {
  if (exit_code_pending) { /* a second signal: no more patience */
    ops_proc_signal_all(SIGKILL);
    return;
  }
  exit_code_pending = 128 + signum;
  if (ops_proc_signal_all(signum) == 0) {
    fflush(stdout);
    exit(exit_code_pending);
  }
  exit_timer = malloc(sizeof *exit_timer);
  if (exit_timer == NULL) exit(exit_code_pending);
  uv_timer_init(ops_loop(), exit_timer);
  uv_timer_start(exit_timer, exit_poll, 50, 50);
}

static void on_signal(uv_signal_t *h, int signum) {
  lua_State *L = ops_main_state();
  (void)h;
  lua_getfield(L, LUA_REGISTRYINDEX, HANDLERS_KEY);
  if (lua_rawgeti(L, -1, signum) != LUA_TFUNCTION) {
    lua_pop(L, 2);
    if (signum == SIGINT || signum == SIGTERM) default_action(signum);
    return;
  }
  /* sched.spawn(handler, "SIGTERM") */
  lua_getglobal(L, "require");
  lua_pushliteral(L, "ops.core.sched");
  if (ops_pcall(L, 1, 1) != LUA_OK) {
    lua_pop(L, 2);
    return;
  }
  lua_getfield(L, -1, "spawn");
  lua_remove(L, -2);
  lua_insert(L, -2);
  lua_pushstring(L, signame_of(signum));
  if (ops_pcall(L, 2, 0) != LUA_OK) {
    lua_pop(L, 1);
    return;
  }
  lua_pop(L, 1);
}

static int watch(int signum) {
  if (signum <= 0 || signum > 64) return UV_EINVAL;
  if (watchers[signum]) return 0;
  uv_signal_t *h = malloc(sizeof *h);
  if (h == NULL) return UV_ENOMEM;
  uv_signal_init(ops_loop(), h);
  int rc = uv_signal_start(h, on_signal, signum);
  if (rc != 0) {
    uv_close((uv_handle_t *)h, (uv_close_cb)free);
    return rc;
  }
  uv_unref((uv_handle_t *)h); /* watching a signal never keeps opsrun alive */
  watchers[signum] = h;
  return 0;
}

void ops_signals_install(lua_State *L) {
  lua_getfield(L, LUA_REGISTRYINDEX, HANDLERS_KEY);
  if (lua_isnil(L, -1)) {
    lua_newtable(L);
    lua_setfield(L, LUA_REGISTRYINDEX, HANDLERS_KEY);
    watch(SIGINT);
    watch(SIGTERM);
  }
  lua_pop(L, 1);
}

/* sys.on_signal(name, fn | nil) -> previous handler | nil : fn(name) runs in a new task
 * on each delivery; nil restores the default */
static int l_on_signal(lua_State *L) {
  const char *name = luaL_checkstring(L, 1);
  int signum = signum_of(name);
  if (signum == 0 || signum == SIGKILL || signum == SIGSTOP || signum == SIGCHLD)
    return luaL_argerror(L, 1, lua_pushfstring(L, "cannot handle signal '%s'", name));
  if (!lua_isnoneornil(L, 2)) luaL_checktype(L, 2, LUA_TFUNCTION);
  int rc = watch(signum);
  if (rc != 0) return luaL_error(L, "cannot watch %s: %s", name, uv_strerror(rc));
  lua_getfield(L, LUA_REGISTRYINDEX, HANDLERS_KEY);
  lua_rawgeti(L, -1, signum);
  lua_pushvalue(L, 2);
  lua_rawseti(L, -3, signum);
  return 1;
}

/* sys.kill(pid, name) -> true | nil, err, code */
static int l_kill(lua_State *L) {
  lua_Integer pid = luaL_checkinteger(L, 1);
  const char *name = luaL_optstring(L, 2, "SIGTERM");
  int signum = strcmp(name, "0") == 0 ? 0 : signum_of(name);
  if (signum == 0 && strcmp(name, "0") != 0) return luaL_argerror(L, 2, "unknown signal");
  if (kill((pid_t)pid, signum) != 0) {
    int e = errno;
    lua_pushnil(L);
    lua_pushfstring(L, "%s: kill %d: %s", uv_err_name(-e), (int)pid, strerror(e));
    lua_pushstring(L, uv_err_name(-e));
    return 3;
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* ---- environment and identity ---- */

/* sys.getenv(name) -> string | nil */
static int l_getenv(lua_State *L) {
  const char *v = getenv(luaL_checkstring(L, 1));
  if (v == NULL) return 0;
  lua_pushstring(L, v);
  return 1;
}

/* sys.setenv(name, value | nil) : nil unsets */
static int l_setenv(lua_State *L) {
  size_t name_len, value_len = 0;
  const char *name = luaL_checklstring(L, 1, &name_len);
  if (*name == '\0' || strchr(name, '=') || strlen(name) != name_len)
    return luaL_argerror(L, 1, "not a valid variable name");
  const char *value = lua_isnoneornil(L, 2) ? NULL : luaL_checklstring(L, 2, &value_len);
  if (value && strlen(value) != value_len) return luaL_argerror(L, 2, "contains a NUL byte"); /* it would be cut */
  int rc = value ? setenv(name, value, 1) : unsetenv(name);
  if (rc != 0) return luaL_error(L, "setenv %s: %s", name, strerror(errno));
  return 0;
}

/* sys.environ() -> {NAME = value, ...} */
static int l_environ(lua_State *L) {
  lua_newtable(L);
  for (char **e = environ; e && *e; e++) {
    const char *eq = strchr(*e, '=');
    if (eq == NULL) continue;
    lua_pushlstring(L, *e, (size_t)(eq - *e));
    lua_pushstring(L, eq + 1);
    lua_rawset(L, -3);
  }
  return 1;
}

/* sys.pid() -> integer */
static int l_pid(lua_State *L) {
  lua_pushinteger(L, getpid());
  return 1;
}

/* sys.uid() -> the effective user id */
static int l_uid(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)geteuid());
  return 1;
}

/* sys.hostname() -> string */
static int l_hostname(lua_State *L) {
  char buf[256];
  size_t n = sizeof buf;
  if (uv_os_gethostname(buf, &n) != 0) return 0;
  lua_pushstring(L, buf);
  return 1;
}

/* sys.isatty(fd) -> boolean */
static int l_isatty(lua_State *L) {
  lua_pushboolean(L, isatty((int)luaL_checkinteger(L, 1)));
  return 1;
}

/* sys.cwd() -> string */
static int l_cwd(lua_State *L) {
  char buf[4096];
  size_t n = sizeof buf;
  if (uv_cwd(buf, &n) != 0) return 0;
  lua_pushstring(L, buf);
  return 1;
}

/* sys.exit(code) : flushes and exits at once (what os.exit does, after stdout is flushed) */
static int l_exit(lua_State *L) {
  int code = (int)luaL_optinteger(L, 1, 0);
  fflush(stdout);
  fflush(stderr);
  exit(code);
  return 0;
}

int luaopen_ops_core_sys(lua_State *L) {
  static const luaL_Reg funcs[] = {{"on_signal", l_on_signal}, {"kill", l_kill},       {"getenv", l_getenv},
                                   {"setenv", l_setenv},       {"environ", l_environ}, {"pid", l_pid}, {"uid", l_uid},
                                   {"hostname", l_hostname},   {"isatty", l_isatty},   {"cwd", l_cwd},
                                   {"exit", l_exit},           {NULL, NULL}};
  ops_signals_install(L);
  luaL_newlib(L, funcs);
  return 1;
}
