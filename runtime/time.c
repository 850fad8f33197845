/* time.c: clocks. Sleeping is a wait, so it lives with the scheduler (ops.sleep). */
#include "opsrun.h"

#include <stdio.h>
#include <time.h>

/* time.now() -> seconds since the epoch, as a float */
static int l_now(lua_State *L) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  lua_pushnumber(L, (double)ts.tv_sec + (double)ts.tv_nsec / 1e9);
  return 1;
}

/* time.monotonic() -> seconds on a clock that never goes back, as a float */
static int l_monotonic(lua_State *L) {
  lua_pushnumber(L, (double)uv_hrtime() / 1e9);
  return 1;
}

/* time.iso8601([t]) -> "2026-11-23T23:26:08.123Z" (UTC) */
static int l_iso8601(lua_State *L) {
  double t;
  if (lua_isnoneornil(L, 1)) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    t = (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
  } else {
    t = luaL_checknumber(L, 1);
  }
  time_t secs = (time_t)t;
  int ms = (int)((t - (double)secs) * 1000.0);
  if (ms < 0) ms = 0;
  if (ms > 999) ms = 999;
  struct tm tm;
  gmtime_r(&secs, &tm);
  char buf[64], out[80];
  if (strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &tm) == 0) buf[0] = '\0';
  snprintf(out, sizeof out, "%s.%03dZ", buf, ms);
  lua_pushstring(L, out);
  return 1;
}

int luaopen_ops_core_time(lua_State *L) {
  static const luaL_Reg funcs[] = {{"now", l_now}, {"monotonic", l_monotonic}, {"iso8601", l_iso8601}, {NULL, NULL}};
  luaL_newlib(L, funcs);
  return 1;
}
