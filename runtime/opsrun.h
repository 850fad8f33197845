/* opsrun.h: what the C files of the host share. */
#ifndef OPSRUN_H
#define OPSRUN_H

#include <stdint.h>

#include <lua.h>
#include <lauxlib.h>
#include <uv.h>

#define OPSRUN_VERSION "0.1.0"

/* ---- primitive modules, preloaded as ops.core.<area> ---- */
int luaopen_ops_core_sched(lua_State *L);
int luaopen_ops_core_proc(lua_State *L);
int luaopen_ops_core_fs(lua_State *L);
int luaopen_ops_core_yaml(lua_State *L);
int luaopen_ops_core_time(lua_State *L);
int luaopen_ops_core_sys(lua_State *L);
int luaopen_ops_core_crypto(lua_State *L);
int luaopen_ops_core_store(lua_State *L);
int luaopen_ops_core_http_client(lua_State *L);
/* http_server.c is a module of its own, embedded and loaded on first use (lazy.c): its
 * preload entry is ops_open_http_server. */
int luaopen_ops_core_http_server(lua_State *L);
int ops_open_http_server(lua_State *L);
/* json_select.cpp is in the same module; its preload entry is ops_open_json_select. */
int ops_open_json_select(lua_State *L);
int luaopen_ops_core_modules(lua_State *L);
int luaopen_cjson(lua_State *L);

/* ---- the loop ---- */
uv_loop_t *ops_loop(void);

/* ---- tasks and waiting (sched.c) ----
 *
 * A primitive that waits:
 *   1. ops_check_task(L, "fs.thing") raises unless L is a task that can yield;
 *   2. starts its libuv work, with an ops_wait embedded in its own state;
 *   3. returns ops_wait_begin(L, &w, timeout), which yields the task.
 * When libuv completes, the primitive pushes its results onto ops_wait_thread(&w)
 * and calls ops_wait_complete(&w, nresults): those become the primitive's results.
 * If the wait times out or its task is cancelled first, the scheduler calls w->cancel(w)
 * (the primitive must stop, free what it can, and never complete that wait), then resumes
 * the task with nil, "timeout", "timeout" (timeouts) or unwinds it (cancellation).
 */
typedef struct ops_task ops_task;
typedef struct ops_wait ops_wait;
struct ops_wait {
  void (*cancel)(ops_wait *w);
  ops_task *task; /* set by ops_wait_begin, cleared when the wait ends */
};

/* A path for the system: a Lua string without NUL bytes (a C string ends at the first, so
 * "a\0b" would name "a"). ops_checkpath: argument arg, as fs's functions check theirs;
 * ops_path_field: the value at idx, what naming it in the error ("opts.cwd"). */
const char *ops_checkpath(lua_State *L, int arg);
const char *ops_path_field(lua_State *L, int idx, const char *what);

void ops_check_task(lua_State *L, const char *what);
int ops_wait_begin(lua_State *L, ops_wait *w, double timeout);
lua_State *ops_wait_thread(ops_wait *w);
void ops_wait_complete(ops_wait *w, int nresults);

/* Call a Lua function from a libuv callback (not inside a task): fn and its args are on
 * L's stack; errors are reported with a traceback and returned as non-zero. */
int ops_pcall(lua_State *L, int nargs, int nresults);
/* Report an error nobody will see otherwise (a callback's error, a lost task's error). */
void ops_report_error(lua_State *L, const char *context, const char *msg);
lua_State *ops_main_state(void);
/* Failed tasks nobody waited for (each reported once on stderr). */
int ops_lost_failures(void);
/* Default SIGINT/SIGTERM handling and Lua signal handlers (sys.c). */
void ops_signals_install(lua_State *L);

/* ---- processes (proc.c): signals forwarded to every child group ---- */
int ops_proc_signal_all(int signum);
int ops_proc_count(void);
/* The signals a child started by ops.proc resets to their default before it execs: bit
 * n-1 for signal n (every signal whose disposition this process may have changed). */
uint64_t ops_proc_signals_to_reset(void);

/* ---- embedded Lua (modules.c) ---- */
typedef struct {
  const char *name;  /* module name, "ops.log", "tools.helm" */
  const char *chunk; /* "@builtin/stdlib/ops/log.lua" */
  const char *src;
  size_t len;
} ops_embedded;
extern const ops_embedded ops_embedded_modules[];
extern const size_t ops_embedded_count;

const ops_embedded *ops_embedded_find(const char *name);
/* name "a.b.c" -> "a/b/c" appended to buf; returns 0, or -1 when the name is unsafe
 * (empty, absolute, a ".." segment) or too long. */
int ops_module_relpath(const char *name, char *buf, size_t buflen);
/* Preloads the C modules (ops.core.*, cjson) and installs the searchers. */
void ops_modules_install(lua_State *L);

#endif
