/* main.c: the host. It builds the Lua state, hands the command line to the embedded
 * `opsrun.cli` module running as the main task, and runs the loop until nothing is left.
 * Everything a user can change lives in Lua; C only bootstraps and reports. */
#include "opsrun.h"

#include <lualib.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int traceback(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (msg == NULL) msg = luaL_tolstring(L, 1, NULL);
  luaL_traceback(L, L, msg, 1);
  return 1;
}

/* Runs under lua_pcall: set up, and start the main task. */
static int bootstrap(lua_State *L) {
  int argc = (int)lua_tointeger(L, 1);
  char **argv = lua_touserdata(L, 2);
  luaL_openlibs(L);
  ops_modules_install(L);
  lua_getglobal(L, "require");
  lua_pushliteral(L, "ops.core.sched");
  lua_call(L, 1, 1);
  lua_getglobal(L, "require");
  lua_pushliteral(L, "opsrun.cli");
  lua_call(L, 1, 1);
  lua_pushvalue(L, -1);
  lua_setfield(L, LUA_REGISTRYINDEX, "opsrun.cli");
  lua_getfield(L, -2, "run_main");
  lua_getfield(L, -2, "main");
  lua_createtable(L, argc, 1);
  lua_pushstring(L, argv[0]);
  lua_rawseti(L, -2, 0);
  for (int i = 1; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i);
  }
  lua_call(L, 2, 1); /* sched.run_main(cli.main, argv) -> task */
  lua_setfield(L, LUA_REGISTRYINDEX, "opsrun.main_task");
  return 0;
}

/* Runs under lua_pcall once the loop is empty: cli.finish(main_task) -> exit code */
static int finish(lua_State *L) {
  lua_getfield(L, LUA_REGISTRYINDEX, "opsrun.cli");
  lua_getfield(L, -1, "finish");
  lua_getfield(L, LUA_REGISTRYINDEX, "opsrun.main_task");
  lua_call(L, 1, 1);
  return 1;
}

static void close_walk(uv_handle_t *h, void *arg) {
  (void)arg;
  if (!uv_is_closing(h)) uv_close(h, NULL);
}

int main(int argc, char **argv) {
  signal(SIGPIPE, SIG_IGN);
  /* The loop makes and frees many small objects per request and per step. glibc's
   * defaults hand the top of the heap back to the kernel as soon as 128 KiB are free and
   * serve blocks over 128 KiB (a pipe's read buffer) with mmap: under load that was a
   * brk or munmap per request and the page faults after it, ~15% of the server's CPU.
   * Freed memory stays in the heap instead; pages never touched cost no RSS. */
  mallopt(M_TRIM_THRESHOLD, 64 << 20);
  mallopt(M_TOP_PAD, 16 << 20);
  mallopt(M_MMAP_THRESHOLD, 16 << 20);
  lua_State *L = luaL_newstate();
  if (L == NULL) {
    fprintf(stderr, "opsrun: cannot create the Lua state (out of memory)\n");
    return 1;
  }
  int code = 1;
  *(void **)lua_getextraspace(L) = NULL; /* not a task; threads made later copy this */
  lua_pushcfunction(L, traceback);
  lua_pushcfunction(L, bootstrap);
  lua_pushinteger(L, argc);
  lua_pushlightuserdata(L, argv);
  if (lua_pcall(L, 2, 0, 1) != LUA_OK) {
    fprintf(stderr, "opsrun: %s\n", lua_tostring(L, -1));
    lua_close(L);
    return 1;
  }
  uv_run(ops_loop(), UV_RUN_DEFAULT);
  lua_settop(L, 1);
  lua_pushcfunction(L, finish);
  if (lua_pcall(L, 0, 1, 1) != LUA_OK) {
    fprintf(stderr, "opsrun: %s\n", lua_tostring(L, -1));
  } else {
    code = (int)lua_tointeger(L, -1);
  }
  fflush(stdout);
  lua_close(L); /* __gc reports any failed task nobody waited for */
  if (code == 0 && ops_lost_failures() > 0) code = 1;
  uv_walk(ops_loop(), close_walk, NULL);
  uv_run(ops_loop(), UV_RUN_DEFAULT);
  uv_loop_close(ops_loop());
  return code;
}
