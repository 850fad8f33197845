/* sched.c: tasks (coroutines) on the one libuv loop.
 *
 * A task is a coroutine pinned in the registry while it runs. A waiting primitive records
 * an ops_wait and yields; when libuv completes the operation, the results are pushed onto
 * the task's stack and the task joins the run queue, which an idle handle drains. Every
 * resume therefore starts from a libuv callback with no Lua code running, so a task's
 * completion can never re-enter another task.
 */
#include "opsrun.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TASK_MT "ops.task"

enum { T_READY, T_RUNNING, T_WAITING, T_DONE, T_FAILED, T_CANCELLED };
static const char *const state_names[] = {"ready", "running", "waiting", "done", "failed", "cancelled"};

typedef struct task_waiter task_waiter;

struct ops_task {
  lua_State *co;
  int co_ref;      /* pins the thread while the task lives */
  int self_ref;    /* pins the userdata while the task lives */
  int results_ref; /* table {n=..., ...} when done; the error value when failed */
  int trace_ref;   /* traceback string when failed */
  int state;
  int nargs; /* values waiting on co's stack for the next resume */
  int observed;
  unsigned long id;
  const char *name;
  ops_wait *wait;
  uv_timer_t *timer; /* wait timeouts; closed when the task ends */
  ops_task *next_ready;
  task_waiter *waiters;
  ops_wait sleep_wait;
};

struct task_waiter {
  ops_wait w;
  ops_task *target;
  task_waiter *next;
};

static lua_State *main_L;
static uv_idle_t runner;
static ops_task *ready_head, *ready_tail;
static unsigned long next_id = 1;
static int lost_failures;

uv_loop_t *ops_loop(void) { return uv_default_loop(); }
lua_State *ops_main_state(void) { return main_L; }
int ops_lost_failures(void) { return lost_failures; }

static void runner_cb(uv_idle_t *h);

static ops_task *task_of(lua_State *L) { return *(ops_task **)lua_getextraspace(L); }

static void enqueue(ops_task *t) {
  t->state = T_READY;
  t->next_ready = NULL;
  if (ready_tail)
    ready_tail->next_ready = t;
  else
    ready_head = t;
  ready_tail = t;
  if (!uv_is_active((uv_handle_t *)&runner)) uv_idle_start(&runner, runner_cb);
}

static void dequeue(ops_task *t) {
  ops_task **p = &ready_head, *prev = NULL;
  while (*p && *p != t) {
    prev = *p;
    p = &(*p)->next_ready;
  }
  if (!*p) return;
  *p = t->next_ready;
  if (ready_tail == t) ready_tail = prev;
  t->next_ready = NULL;
}

void ops_report_error(lua_State *L, const char *context, const char *msg) {
  (void)L;
  fflush(stdout);
  fprintf(stderr, "opsrun: %s: %s\n", context, msg);
  fflush(stderr);
}

static int traceback_handler(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (msg == NULL) msg = luaL_tolstring(L, 1, NULL);
  luaL_traceback(L, L, msg, 1);
  return 1;
}

int ops_pcall(lua_State *L, int nargs, int nresults) {
  int base = lua_gettop(L) - nargs;
  lua_pushcfunction(L, traceback_handler);
  lua_insert(L, base);
  int st = lua_pcall(L, nargs, nresults, base);
  lua_remove(L, base);
  if (st != LUA_OK) {
    ops_report_error(L, "error in callback", lua_tostring(L, -1));
    lua_pop(L, 1);
  }
  return st;
}

void ops_check_task(lua_State *L, const char *what) {
  ops_task *t = task_of(L);
  if (t == NULL || t->co != L || !lua_isyieldable(L))
    luaL_error(L,
               "%s must be called from a task (not while a module loads, in a callback or "
               "a metamethod, or in a plain coroutine)",
               what);
}

/* ---- timeouts ---- */

static void timer_close_cb(uv_handle_t *h) { free(h); }

static void on_wait_timeout(uv_timer_t *timer) {
  ops_task *t = timer->data;
  ops_wait *w = t->wait;
  if (t->state != T_WAITING || w == NULL) return;
  t->wait = NULL;
  w->task = NULL;
  if (w->cancel) w->cancel(w);
  lua_checkstack(t->co, 3);
  lua_pushnil(t->co);
  lua_pushliteral(t->co, "timeout");
  lua_pushliteral(t->co, "timeout");
  t->nargs = 3;
  enqueue(t);
}

/* Marks L's task as waiting on w, arming the timeout; the caller then yields. */
static void wait_setup(lua_State *L, ops_wait *w, double timeout) {
  ops_task *t = task_of(L);
  if (timeout >= 0 && t->timer == NULL) {
    t->timer = malloc(sizeof *t->timer);
    if (t->timer == NULL) luaL_error(L, "out of memory");
    uv_timer_init(ops_loop(), t->timer);
    t->timer->data = t;
  }
  w->task = t;
  t->wait = w;
  t->state = T_WAITING;
  if (timeout >= 0) {
    double ms = timeout * 1000.0;
    if (ms > 9e15) ms = 9e15;
    uv_timer_start(t->timer, on_wait_timeout, (uint64_t)(ms + 0.5), 0);
  }
}

int ops_wait_begin(lua_State *L, ops_wait *w, double timeout) {
  wait_setup(L, w, timeout);
  return lua_yield(L, 0);
}

lua_State *ops_wait_thread(ops_wait *w) { return w->task ? w->task->co : NULL; }

void ops_wait_complete(ops_wait *w, int nresults) {
  ops_task *t = w->task;
  if (t == NULL) return;
  w->task = NULL;
  t->wait = NULL;
  if (t->timer) uv_timer_stop(t->timer);
  t->nargs = nresults;
  enqueue(t);
}

/* ---- task lifecycle ---- */

static void wake_waiters(ops_task *t) {
  while (t->waiters) {
    task_waiter *tw = t->waiters;
    t->waiters = tw->next;
    tw->target = NULL;
    lua_State *co = ops_wait_thread(&tw->w);
    if (co == NULL) {
      free(tw);
      continue;
    }
    lua_checkstack(co, 1);
    lua_pushboolean(co, 1); /* "the target ended"; task:wait reads the outcome itself */
    ops_wait_complete(&tw->w, 1);
    free(tw);
    t->observed = 1;
  }
}

static void task_release(lua_State *L, ops_task *t) {
  if (t->timer) {
    uv_timer_stop(t->timer);
    uv_close((uv_handle_t *)t->timer, timer_close_cb);
    t->timer = NULL;
  }
  luaL_unref(L, LUA_REGISTRYINDEX, t->co_ref);
  t->co_ref = LUA_NOREF;
  t->co = NULL;
  wake_waiters(t);
  luaL_unref(L, LUA_REGISTRYINDEX, t->self_ref);
  t->self_ref = LUA_NOREF;
}

static void finish_ok(ops_task *t, int nres) {
  lua_State *L = main_L;
  lua_checkstack(L, nres + 2);
  lua_xmove(t->co, L, nres);
  lua_createtable(L, nres, 1);
  lua_insert(L, -nres - 1);
  for (int i = nres; i >= 1; i--) lua_rawseti(L, -i - 1, i);
  lua_pushinteger(L, nres);
  lua_setfield(L, -2, "n");
  t->results_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  t->state = T_DONE;
  lua_resetthread(t->co); /* nothing pending; keeps the state tidy */
  task_release(L, t);
}

static int tostring_value(lua_State *L) {
  luaL_tolstring(L, 1, NULL);
  return 1;
}

static void finish_error(ops_task *t) {
  lua_State *L = main_L;
  lua_State *co = t->co;
  lua_checkstack(L, 4);
  lua_pushvalue(co, -1);
  lua_xmove(co, L, 1); /* L: err */
  t->results_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  /* the message, through __tostring when the error is an object, under protection */
  lua_pushcfunction(L, tostring_value);
  lua_pushvalue(co, -1);
  lua_xmove(co, L, 1);
  if (lua_pcall(L, 1, 1, 0) != LUA_OK || lua_type(L, -1) != LUA_TSTRING) {
    lua_pop(L, 1);
    lua_pushliteral(L, "(error object without a message)");
  }
  luaL_traceback(L, co, lua_tostring(L, -1), 0);
  t->trace_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pop(L, 1);
  t->state = T_FAILED;
  lua_resetthread(co); /* close pending to-be-closed variables */
  t->observed = t->waiters != NULL;
  task_release(L, t);
}

static void task_resume(ops_task *t) {
  int nres = 0;
  int nargs = t->nargs;
  t->nargs = 0;
  t->state = T_RUNNING;
  int st = lua_resume(t->co, NULL, nargs, &nres);
  if (st == LUA_YIELD) {
    lua_pop(t->co, nres);
    if (t->state == T_RUNNING) enqueue(t); /* a bare coroutine.yield(): let others run */
  } else if (st == LUA_OK) {
    finish_ok(t, nres);
  } else {
    finish_error(t);
  }
}

static void runner_cb(uv_idle_t *h) {
  /* Only the tasks ready now: one resumed here that spawns or yields again waits a turn,
   * so I/O is never starved. */
  /* Counted, not "up to the task that was last": that task may be cancelled (dequeued)
   * during the round, and the round would then never end while a task keeps yielding. */
  size_t n = 0;
  for (ops_task *t = ready_head; t; t = t->next_ready) n++;
  while (ready_head && n-- > 0) {
    ops_task *t = ready_head;
    ready_head = t->next_ready;
    if (ready_head == NULL) ready_tail = NULL;
    t->next_ready = NULL;
    task_resume(t);
  }
  if (ready_head == NULL) uv_idle_stop(h);
}

/* Creates a task running the function at the top of L's stack below nargs arguments. */
static ops_task *task_new(lua_State *L, int nargs) {
  int fn = lua_gettop(L) - nargs;
  ops_task *t = lua_newuserdatauv(L, sizeof *t, 0);
  memset(t, 0, sizeof *t);
  t->co_ref = t->self_ref = t->results_ref = t->trace_ref = LUA_NOREF;
  luaL_setmetatable(L, TASK_MT);
  t->id = next_id++;
  lua_State *co = lua_newthread(L);
  *(ops_task **)lua_getextraspace(co) = t;
  t->co = co;
  t->co_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushvalue(L, -1);
  t->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  /* stack: fn args... task */
  lua_insert(L, fn);
  /* stack: task fn args... */
  lua_xmove(L, co, nargs + 1);
  t->nargs = nargs;
  enqueue(t);
  return t;
}

/* ops.spawn(fn, ...) -> task */
static int l_spawn(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  task_new(L, lua_gettop(L) - 1);
  return 1;
}

static ops_task *check_task(lua_State *L, int i) { return luaL_checkudata(L, i, TASK_MT); }

static void waiter_cancel(ops_wait *w) {
  task_waiter *tw = (task_waiter *)w;
  if (tw->target) {
    task_waiter **p = &tw->target->waiters;
    while (*p && *p != tw) p = &(*p)->next;
    if (*p) *p = tw->next;
  }
  free(tw);
}

static int push_outcome(lua_State *L, ops_task *t) {
  t->observed = 1;
  if (t->state == T_DONE) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, t->results_ref);
    int n = (lua_getfield(L, -1, "n"), (int)lua_tointeger(L, -1));
    lua_pop(L, 1);
    luaL_checkstack(L, n + 1, "too many results");
    lua_pushboolean(L, 1);
    for (int i = 1; i <= n; i++) lua_rawgeti(L, -2 - (i - 1), i);
    lua_remove(L, -n - 2);
    return n + 1;
  }
  lua_pushboolean(L, 0);
  if (t->state == T_FAILED) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, t->results_ref);
    return 2;
  }
  lua_pushliteral(L, "cancelled");
  lua_pushliteral(L, "cancelled");
  return 3;
}

static int wait_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  ops_task *t = (ops_task *)ctx;
  /* resumed with (true) when the target ended, or (nil, "timeout", "timeout") */
  if (lua_gettop(L) >= 4 && lua_isnil(L, 2)) {
    lua_pushboolean(L, 0);
    lua_pushliteral(L, "timeout");
    lua_pushliteral(L, "timeout");
    return 3;
  }
  return push_outcome(L, t);
}

/* task:wait([timeout]) -> true, ... | false, err | false, "timeout"|"cancelled", code */
static int l_task_wait(lua_State *L) {
  ops_task *t = check_task(L, 1);
  double timeout = luaL_optnumber(L, 2, -1);
  if (t->state >= T_DONE) return push_outcome(L, t);
  ops_check_task(L, "task:wait");
  if (task_of(L) == t) return luaL_error(L, "a task cannot wait for itself");
  task_waiter *tw = calloc(1, sizeof *tw);
  if (tw == NULL) return luaL_error(L, "out of memory");
  tw->w.cancel = waiter_cancel;
  tw->target = t;
  tw->next = t->waiters;
  t->waiters = tw;
  lua_settop(L, 1);
  wait_setup(L, &tw->w, timeout);
  return lua_yieldk(L, 0, (lua_KContext)t, wait_k);
}

/* task:cancel() -> true if it was running, false if it had already ended */
static int l_task_cancel(lua_State *L) {
  ops_task *t = check_task(L, 1);
  if (t->state >= T_DONE) {
    lua_pushboolean(L, 0);
    return 1;
  }
  if (t->state == T_RUNNING || task_of(L) == t)
    return luaL_error(L, "a task cannot cancel itself (return or raise an error instead)");
  if (t->state == T_WAITING && t->wait) {
    ops_wait *w = t->wait;
    t->wait = NULL;
    w->task = NULL;
    if (w->cancel) w->cancel(w);
  }
  if (t->state == T_READY) dequeue(t);
  /* cancelled before its <close> handlers run: one that cancels this task again finds it over */
  t->state = T_CANCELLED;
  t->observed = 1;
  lua_State *co = t->co;
  lua_settop(co, 0);
  int st = lua_resetthread(co); /* runs the task's pending <close> handlers */
  if (st != LUA_OK) {
    const char *msg = lua_tostring(co, -1);
    ops_report_error(L, "error while closing a cancelled task", msg ? msg : "?");
  }
  task_release(L, t);
  lua_pushboolean(L, 1);
  return 1;
}

/* task:status() -> "ready"|"running"|"waiting"|"done"|"failed"|"cancelled" */
static int l_task_status(lua_State *L) {
  ops_task *t = check_task(L, 1);
  lua_pushstring(L, state_names[t->state]);
  return 1;
}

/* task:traceback() -> string | nil */
static int l_task_traceback(lua_State *L) {
  ops_task *t = check_task(L, 1);
  if (t->trace_ref == LUA_NOREF) return 0;
  lua_rawgeti(L, LUA_REGISTRYINDEX, t->trace_ref);
  return 1;
}

static int l_task_tostring(lua_State *L) {
  ops_task *t = check_task(L, 1);
  lua_pushfstring(L, "task %d (%s)", (int)t->id, state_names[t->state]);
  return 1;
}

static int l_task_index(lua_State *L) {
  ops_task *t = check_task(L, 1);
  const char *k = luaL_checkstring(L, 2);
  if (strcmp(k, "id") == 0) {
    lua_pushinteger(L, (lua_Integer)t->id);
    return 1;
  }
  lua_getmetatable(L, 1);
  lua_getfield(L, -1, "methods");
  lua_getfield(L, -1, k);
  return 1;
}

static int l_task_gc(lua_State *L) {
  ops_task *t = check_task(L, 1);
  if (t->timer) { /* a task still waiting when the state closes */
    uv_timer_stop(t->timer);
    uv_close((uv_handle_t *)t->timer, timer_close_cb);
    t->timer = NULL;
  }
  if (t->state == T_FAILED && !t->observed) {
    lost_failures++;
    lua_rawgeti(L, LUA_REGISTRYINDEX, t->trace_ref);
    ops_report_error(L, "error in a task nobody waited for", lua_tostring(L, -1));
    lua_pop(L, 1);
    t->observed = 1;
  }
  luaL_unref(L, LUA_REGISTRYINDEX, t->results_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, t->trace_ref);
  t->results_ref = t->trace_ref = LUA_NOREF;
  return 0;
}

/* ---- sleeping ---- */

static void sleep_cancel(ops_wait *w) { (void)w; }

/* sched.sleep(seconds) : waits; returns nothing useful */
static int l_sleep(lua_State *L) {
  double s = luaL_checknumber(L, 1);
  ops_check_task(L, "ops.sleep");
  if (!(s > 0)) s = 0; /* negative or NaN: a NaN timeout would mean "for ever" */
  ops_task *t = task_of(L);
  t->sleep_wait.cancel = sleep_cancel;
  return ops_wait_begin(L, &t->sleep_wait, s);
}

/* sched.current() -> task | nil */
static int l_current(lua_State *L) {
  ops_task *t = task_of(L);
  if (t == NULL || t->self_ref == LUA_NOREF) return 0;
  lua_rawgeti(L, LUA_REGISTRYINDEX, t->self_ref);
  return 1;
}

/* ---- suspend / wake: the building block for Lua-level sync (mutexes, queues) ---- */

typedef struct {
  ops_wait w;
} suspend_wait;

static void suspend_cancel(ops_wait *w) { (void)w; }

/* sched.suspend([timeout]) -> values given to wake | nil, "timeout", "timeout" */
static int l_suspend(lua_State *L) {
  double timeout = luaL_optnumber(L, 1, -1);
  ops_check_task(L, "ops.suspend");
  ops_task *t = task_of(L);
  t->sleep_wait.cancel = suspend_cancel;
  return ops_wait_begin(L, &t->sleep_wait, timeout);
}

/* sched.wake(task, ...) -> true if the task was suspended and is now ready */
static int l_wake(lua_State *L) {
  ops_task *t = check_task(L, 1);
  int n = lua_gettop(L) - 1;
  if (t->state != T_WAITING || t->wait != &t->sleep_wait || t->sleep_wait.cancel != suspend_cancel) {
    lua_pushboolean(L, 0);
    return 1;
  }
  lua_checkstack(t->co, n);
  lua_xmove(L, t->co, n);
  ops_wait_complete(&t->sleep_wait, n);
  lua_pushboolean(L, 1);
  return 1;
}

/* sched.lost_failures() -> number of failed tasks nobody waited for */
static int l_lost_failures(lua_State *L) {
  lua_pushinteger(L, lost_failures);
  return 1;
}

/* sched.run_main(fn, ...) -> task : the main chunk's task */
static int l_run_main(lua_State *L) { return l_spawn(L); }

int luaopen_ops_core_sched(lua_State *L) {
  static const luaL_Reg funcs[] = {{"spawn", l_spawn},
                                   {"sleep", l_sleep},
                                   {"current", l_current},
                                   {"suspend", l_suspend},
                                   {"wake", l_wake},
                                   {"lost_failures", l_lost_failures},
                                   {"run_main", l_run_main},
                                   {NULL, NULL}};
  static const luaL_Reg methods[] = {{"wait", l_task_wait},
                                     {"cancel", l_task_cancel},
                                     {"status", l_task_status},
                                     {"traceback", l_task_traceback},
                                     {NULL, NULL}};
  if (main_L == NULL) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
    main_L = lua_tothread(L, -1);
    lua_pop(L, 1);
    /* Lua leaves the extra space uninitialised, and every new thread copies the main
     * thread's: NULL there means "not a task" for every coroutine made outside spawn. */
    *(ops_task **)lua_getextraspace(main_L) = NULL;
    uv_idle_init(ops_loop(), &runner);
  }
  if (luaL_newmetatable(L, TASK_MT)) {
    luaL_newlib(L, methods);
    lua_setfield(L, -2, "methods");
    lua_pushcfunction(L, l_task_index);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, l_task_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pushcfunction(L, l_task_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  luaL_newlib(L, funcs);
  return 1;
}
