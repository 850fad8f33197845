/* proc.c: child processes on the loop.
 *
 * Each child runs in its own session and process group (so a timeout or a forwarded
 * signal reaches its whole tree), never through a shell. Its output arrives through pipes
 * we make ourselves (close-on-exec on our ends, so one child never holds another's pipe
 * open). A run is over when the child has exited and both pipes are at end of file; after
 * a kill, a hard deadline closes pipes a grandchild still holds.
 *
 * The C struct owns every libuv handle and outlives its Lua handle when it must: it is
 * freed when its last handle has closed.
 */
#define _GNU_SOURCE /* strerrorname_np */
#include "linebuf.h"
#include "opsrun.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <pthread.h>

extern char **environ;

#define PROC_MT "ops.proc"
#define MAX_LINE (1024 * 1024)
#define DEFAULT_CAPTURE (1024 * 1024)

enum { S_CAPTURE, S_INHERIT, S_IGNORE, S_FILE, S_MERGE };

typedef struct proc proc;

typedef struct {
  uv_pipe_t pipe;
  proc *p;
  const char *name;
  int mode;
  int reading; /* our read end is open */
  int grown;   /* the pipe was made larger (it filled up) */
  int cb_ref;  /* line callback, or LUA_NOREF */
  ops_linebuf lines;
  ops_tailbuf tail;
} stream;

struct proc {
  stream out, err;
  uv_pipe_t in;
  uv_write_t wreq;
  uv_timer_t timer;
  int in_open, in_ref;
  int handles; /* open libuv handles, the unreaped child and the Lua handle: freed at 0 */
  int exited, term_signal;
  int64_t exit_status;
  int timed_out, killed, phase, done, in_live;
  double timeout, grace, drain;
  uint64_t start;
  double duration;
  int cb_error_ref; /* the first error a line callback raised */
  int linger_ref;   /* opts.on_linger, or LUA_NOREF */
  pid_t pid;
  ops_wait w;
  struct proc_ud *ud;
  proc *next, *prev;
};

typedef struct proc_ud {
  proc *p;
} proc_ud;

/* PH_LINGER: the child exited, its pipes did not close: opts.on_linger is called when the
 * timer (drain seconds) fires, and the run goes on waiting for them */
enum { PH_RUN, PH_TERM, PH_KILL, PH_LINGER };

static proc *live;
static int live_count;
/* A pipe that fills up (PIPE_GROW_AT: Linux's default size) is grown to PIPE_SIZE, so a
 * chatty child runs ahead with fewer switches between it and us (a failure is no matter).
 * Pipes are read into readbuf, as large as that, until their tail can take reads in place
 * (at least MIN_READ bytes): see on_alloc. */
#define PIPE_GROW_AT (64 * 1024)
#define PIPE_SIZE (256 * 1024)
#define MIN_READ (64 * 1024)
static char readbuf[PIPE_SIZE];
static int devnull = -1; /* opened once, close-on-exec: what "ignore" and stdin default to */

static int running; /* children spawned and not yet reaped */
static char **env_block; /* l_spawn's environment for a child, with env_block_size bytes */
static size_t env_block_size;

/* What sys.c waits for before it exits on a signal: children not yet reaped (a pipe that
 * something outside the child's group still holds must not keep opsrun alive). */
int ops_proc_count(void) { return running; }

/* seconds -> a libuv timer's milliseconds: NaN and negatives are 0, huge values (math.huge)
 * a deadline that never comes, rather than an out-of-range conversion. */
static uint64_t ms_of(double s) {
  if (!(s > 0)) return 0;
  if (s > 9e12) return (uint64_t)9e15;
  return (uint64_t)(s * 1000);
}

int ops_proc_signal_all(int signum) {
  int n = 0;
  for (proc *p = live; p; p = p->next)
    if (kill(-p->pid, signum) == 0) n++;
  return n;
}

static void unlink_live(proc *p) {
  if (!p->in_live) return;
  p->in_live = 0;
  if (p->prev)
    p->prev->next = p->next;
  else if (live == p)
    live = p->next;
  if (p->next) p->next->prev = p->prev;
  p->next = p->prev = NULL;
  live_count--;
}

static void proc_free(proc *p) {
  lua_State *L = ops_main_state();
  luaL_unref(L, LUA_REGISTRYINDEX, p->out.cb_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, p->err.cb_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, p->in_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, p->cb_error_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, p->linger_ref);
  ops_linebuf_free(&p->out.lines);
  ops_linebuf_free(&p->err.lines);
  ops_tailbuf_free(&p->out.tail);
  ops_tailbuf_free(&p->err.tail);
  if (p->ud) p->ud->p = NULL;
  free(p);
}

static void handle_closed(uv_handle_t *h) {
  proc *p = h->data;
  if (--p->handles == 0) proc_free(p);
}

static void close_handle(proc *p, uv_handle_t *h) {
  (void)p;
  if (!uv_is_closing(h)) uv_close(h, handle_closed);
}

static const char *signal_name(int sig) {
  switch (sig) {
    case SIGTERM: return "SIGTERM";
    case SIGKILL: return "SIGKILL";
    case SIGINT: return "SIGINT";
    case SIGHUP: return "SIGHUP";
    case SIGQUIT: return "SIGQUIT";
    case SIGSEGV: return "SIGSEGV";
    case SIGABRT: return "SIGABRT";
    case SIGPIPE: return "SIGPIPE";
    case SIGUSR1: return "SIGUSR1";
    case SIGUSR2: return "SIGUSR2";
    case SIGBUS: return "SIGBUS";
    case SIGFPE: return "SIGFPE";
    case SIGILL: return "SIGILL";
    case SIGALRM: return "SIGALRM";
    default: return "SIG?";
  }
}

static void push_result(lua_State *L, proc *p) {
  lua_createtable(L, 0, 10);
  if (p->exited && p->term_signal == 0) {
    lua_pushinteger(L, p->exit_status);
    lua_setfield(L, -2, "code");
  }
  if (p->term_signal) {
    lua_pushstring(L, signal_name(p->term_signal));
    lua_setfield(L, -2, "signal");
  }
  lua_pushboolean(L, p->exited && p->term_signal == 0 && p->exit_status == 0 && !p->timed_out);
  lua_setfield(L, -2, "ok");
  lua_pushboolean(L, p->timed_out);
  lua_setfield(L, -2, "timed_out");
  lua_pushnumber(L, p->duration);
  lua_setfield(L, -2, "duration");
  lua_pushinteger(L, p->pid);
  lua_setfield(L, -2, "pid");
  stream *ss[2] = {&p->out, &p->err};
  const char *trunc[2] = {"stdout_truncated", "stderr_truncated"};
  for (int i = 0; i < 2; i++) {
    stream *s = ss[i];
    if (s->mode != S_CAPTURE) continue;
    size_t n;
    const char *d = ops_tailbuf_data(&s->tail, &n);
    lua_pushlstring(L, d, n);
    lua_setfield(L, -2, s->name);
    if (s->tail.truncated) {
      lua_pushboolean(L, 1);
      lua_setfield(L, -2, trunc[i]);
    }
  }
}

/* Called whenever a part ends: completes the run once the child exited and the pipes closed. */
static void maybe_done(proc *p) {
  if (p->done || !p->exited || p->out.reading || p->err.reading) return;
  p->done = 1;
  unlink_live(p);
  if (p->in_open) { /* input still pending (a daemon holds the pipe): the run is over */
    p->in_open = 0;
    close_handle(p, (uv_handle_t *)&p->in);
  }
  if (uv_is_active((uv_handle_t *)&p->timer)) uv_timer_stop(&p->timer);
  close_handle(p, (uv_handle_t *)&p->timer);
  lua_State *co = ops_wait_thread(&p->w);
  if (co == NULL) return;
  if (p->cb_error_ref != LUA_NOREF) {
    lua_checkstack(co, 2);
    lua_pushnil(co);
    lua_rawgeti(co, LUA_REGISTRYINDEX, p->cb_error_ref);
    ops_wait_complete(&p->w, 2);
    return;
  }
  lua_checkstack(co, 4);
  push_result(co, p);
  ops_wait_complete(&p->w, 1);
}

static void stop_reading(stream *s) {
  if (!s->reading) return;
  s->reading = 0;
  uv_read_stop((uv_stream_t *)&s->pipe);
  close_handle(s->p, (uv_handle_t *)&s->pipe);
}

/* ---- kill sequence: TERM, grace, KILL, drain ---- */

static void call_linger(proc *p);

static void on_timer(uv_timer_t *t) {
  proc *p = t->data;
  if (p->phase == PH_LINGER) {
    p->phase = PH_RUN;
    call_linger(p);
    return;
  }
  if (p->phase == PH_RUN) {
    if (!p->killed) p->timed_out = 1; /* the timeout, rather than a kill request */
    p->killed = 1;
    p->phase = PH_TERM;
    kill(-p->pid, SIGTERM);
    uv_timer_start(&p->timer, on_timer, ms_of(p->grace), 0);
  } else if (p->phase == PH_TERM) {
    p->phase = PH_KILL;
    kill(-p->pid, SIGKILL);
    uv_timer_start(&p->timer, on_timer, ms_of(p->drain), 0);
  } else {
    /* the hard deadline: whatever still holds our pipes cannot hang us */
    stop_reading(&p->out);
    stop_reading(&p->err);
    if (!p->exited) {
      uv_timer_start(&p->timer, on_timer, 1000, 0);
      return;
    }
    maybe_done(p);
  }
}

static void start_kill(proc *p) {
  if (p->killed || p->done) return;
  p->killed = 1;
  p->phase = PH_RUN;
  uv_timer_stop(&p->timer);
  on_timer(&p->timer);
}

static void release(proc *p) {
  if (--p->handles == 0) proc_free(p);
}

static void child_exited(proc *p, int status) {
  p->exited = 1;
  if (WIFSIGNALED(status)) {
    p->term_signal = WTERMSIG(status);
  } else {
    p->exit_status = WEXITSTATUS(status);
  }
  p->duration = (double)(uv_hrtime() - p->start) / 1e9;
  if (p->killed && p->phase == PH_TERM && (p->out.reading || p->err.reading)) {
    /* the child is gone but something in its group still holds a pipe: no more grace */
    uv_timer_stop(&p->timer);
    on_timer(&p->timer);
  } else if (!p->killed && p->linger_ref != LUA_NOREF && (p->out.reading || p->err.reading) &&
             !uv_is_active((uv_handle_t *)&p->timer)) {
    /* a process the child started still holds a pipe (a `cmd &` in a script): say so if it
     * still does in drain seconds (with a timeout set, the timeout speaks for it) */
    p->phase = PH_LINGER;
    uv_timer_start(&p->timer, on_timer, ms_of(p->drain), 0);
  }
  maybe_done(p);
  release(p); /* the child is reaped */
}

/* Children are started with vfork (no page tables copied, so spawning stays cheap
 * however big opsrun is: start_child below) and reaped on SIGCHLD, or as soon as both their pipes
 * are closed (a child's pipes close as it exits, so it is usually gone by then: no need to
 * wait for the signal to come round the loop).
 *
 * Only our own children are reaped: one started some other way (io.popen, os.execute) is
 * left for whoever waits for it. waitid(WNOWAIT) names an exited child without reaping it;
 * if that child is ours it is reaped by pid, and so on until none is left. A child that is
 * not ours would be named again and again, so then ours are each asked for by pid. */
static uv_signal_t sigchld;
static int sigchld_ready;

static void reaped(proc *p, int status) {
  if (--running == 0) uv_unref((uv_handle_t *)&sigchld);
  child_exited(p, status);
}

static proc *find_running(pid_t pid) {
  for (proc *p = live; p; p = p->next)
    if (p->pid == pid && !p->exited) return p;
  return NULL;
}

static void reap_if_exited(proc *p) {
  int status;
  if (!p->exited && waitpid(p->pid, &status, WNOHANG) == p->pid) reaped(p, status);
}

static void on_sigchld(uv_signal_t *h, int signum) {
  (void)h;
  (void)signum;
  for (;;) {
    siginfo_t info;
    info.si_pid = 0;
    if (waitid(P_ALL, 0, &info, WEXITED | WNOHANG | WNOWAIT) != 0 || info.si_pid == 0) return;
    proc *p = find_running(info.si_pid);
    if (p == NULL) break; /* not ours */
    int status;
    if (waitpid(p->pid, &status, WNOHANG) != p->pid) break;
    reaped(p, status);
  }
  proc *next;
  for (proc *p = live; p; p = next) {
    next = p->next;
    if (p->exited) continue;
    int status;
    pid_t r = waitpid(p->pid, &status, WNOHANG);
    if (r == p->pid || (r < 0 && errno == ECHILD)) reaped(p, r < 0 ? 0 : status);
  }
}

static int watch_children(void) {
  if (!sigchld_ready) {
    uv_signal_init(ops_loop(), &sigchld);
    int rc = uv_signal_start(&sigchld, on_sigchld, SIGCHLD);
    if (rc != 0) return rc;
    uv_unref((uv_handle_t *)&sigchld);
    sigchld_ready = 1;
  }
  return 0;
}

/* ---- the signals a child resets ----
 * A child must not start with a disposition of ours: an ignored signal stays ignored
 * through execve, and a handler left in place would run in our memory if its signal came
 * in between the child's unblocking and its execve. Asking the kernel for all 64 in each
 * child cost ~17 us per child (bench/README.md, "Deploy"). Instead every disposition set in
 * this process is noted here: sigaction and signal are defined below, forwarding to glibc,
 * and the libraries opsrun loads (libuv, libh2o, libcurl, libcrypto) call these (the
 * executable exports them, and comes first in the lookup); what was set before, by glibc
 * (its internal signals) or by whoever started us (an ignored SIGINT in a shell's
 * background job, nohup's SIGHUP), is read from the kernel once, at the first child. A
 * noted signal stays noted: a child resets it, whatever it is now. AddressSanitizer
 * defines sigaction itself: its builds reset every signal. */
#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define TRACK_DISPOSITIONS 0 /* clang */
#endif
#endif
#if !defined(TRACK_DISPOSITIONS) && defined(__SANITIZE_ADDRESS__)
#define TRACK_DISPOSITIONS 0
#endif
#ifndef TRACK_DISPOSITIONS
#define TRACK_DISPOSITIONS 1
#endif

#if TRACK_DISPOSITIONS
static _Atomic(uint64_t) touched_signals; /* bit n-1: signal n's disposition was set */

extern int __sigaction(int sig, const struct sigaction *act, struct sigaction *old);

static void touch(int sig) {
  if (sig >= 1 && sig <= 64) atomic_fetch_or(&touched_signals, (uint64_t)1 << (sig - 1));
}

int sigaction(int sig, const struct sigaction *restrict act, struct sigaction *restrict old) {
  if (act) touch(sig);
  return __sigaction(sig, act, old);
}

/* glibc's signal(): BSD semantics (the signal blocked in its handler, calls restarted) */
__sighandler_t signal(int sig, __sighandler_t handler) {
  struct sigaction act, old;
  memset(&act, 0, sizeof act);
  act.sa_handler = handler;
  sigemptyset(&act.sa_mask);
  if (sig >= 1 && sig < _NSIG) sigaddset(&act.sa_mask, sig);
  act.sa_flags = SA_RESTART;
  if (sigaction(sig, &act, &old) < 0) return SIG_ERR;
  return old.sa_handler;
}
#endif

/* The signals a child resets: bit n-1 for signal n. */
uint64_t ops_proc_signals_to_reset(void) {
#if TRACK_DISPOSITIONS
  static int read_once;
  if (!read_once) {
    for (int sig = 1; sig < _NSIG && sig <= 64; sig++) {
      struct sigaction sa;
      if (__sigaction(sig, NULL, &sa) == 0 && sa.sa_handler != SIG_DFL) touch(sig);
    }
    read_once = 1;
  }
  return atomic_load(&touched_signals);
#else
  return ~(uint64_t)0;
#endif
}

/* The child's side of start_child, on the parent's stack while the parent waits (vfork):
 * only system calls, nothing that allocates, locks or returns. Every signal is blocked
 * (the parent blocked them before vfork), so no handler of ours runs here; each signal
 * whose disposition may not be the default (reset: ops_proc_signals_to_reset) goes back
 * to it, then the mask is emptied and the program replaces us. Raw system calls: glibc's
 * wrappers refuse its internal signals and a sanitizer's interceptors keep state in the
 * memory we share. */
__attribute__((noreturn, no_sanitize_address, no_sanitize_undefined))
static void child_exec(const char *program, char *const args[], char *const envp[], const int from[3],
                       const char *cwd, uint64_t reset, volatile int *err, volatile int *in_cwd) {
  /* the kernel's struct sigaction, all zero: SIG_DFL, no flags, no mask (a buffer larger than
   * it on every architecture); the kernel's sigset is (_NSIG - 1) / 8 bytes (glibc's _NSIG
   * counts one more) */
  const unsigned long zeros[8] = {0};
  const long setsize = (_NSIG - 1) / 8;
  for (long sig = 1; sig < _NSIG && sig <= 64; sig++)
    if ((reset >> (sig - 1) & 1) && sig != SIGKILL && sig != SIGSTOP)
      syscall(SYS_rt_sigaction, sig, zeros, NULL, setsize);
  if (syscall(SYS_setsid) < 0) goto fail;
  for (int i = 0; i < 3; i++) {
    /* dup2 onto itself would keep close-on-exec: clear it instead (dup3: arm64 has no dup2) */
    if (from[i] == i ? syscall(SYS_fcntl, i, F_SETFD, 0) < 0 : syscall(SYS_dup3, from[i], i, 0) < 0) goto fail;
  }
  if (cwd && syscall(SYS_chdir, cwd) < 0) {
    *in_cwd = 1;
    goto fail;
  }
  syscall(SYS_rt_sigprocmask, SIG_SETMASK, zeros, NULL, setsize);
  syscall(SYS_execve, program, args, envp);
fail:
  *err = errno;
  syscall(SYS_exit_group, 127);
  for (;;) {}
}

/* Starts program with fds from[0..2] as its 0..2, in cwd (or ours), in a session of its
 * own. Returns 0 and the pid, or the errno of what failed in the child (execve's ENOENT,
 * EACCES, ENOEXEC; chdir's, with *cwd_failed set: cwd is not looked at beforehand) or of
 * vfork. A vfork shares our memory until the child
 * calls execve, which is why the child can hand its errno back in child_err; the failed
 * child has exited when we resume, and is reaped here. glibc's posix_spawn does the same
 * (and more: a stack mapped and unmapped per call, every disposition read before it is
 * reset), measured 40 - 60 us slower per child (bench/README.md, "Deploy"). */
static int start_child(const char *program, char *const args[], char *const envp[], const int from[3],
                       const char *cwd, pid_t *pid_out, int *cwd_failed) {
  uint64_t reset = ops_proc_signals_to_reset();
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  volatile int child_err = 0, child_in_cwd = 0;
  pid_t pid = vfork();
  if (pid == 0) child_exec(program, args, envp, from, cwd, reset, &child_err, &child_in_cwd);
  int e = pid < 0 ? errno : child_err;
  *cwd_failed = pid > 0 && child_in_cwd;
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  if (pid > 0 && e != 0) {
    int status;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
  }
  if (e == 0) *pid_out = pid;
  return e;
}

/* Finds argv0 (a name without '/') the way execvp would, in the PATH the child will get.
 * Returns 0 and the path in buf, or an errno (ENOENT, EACCES). */
static int find_program(const char *name, const char *path_var, char *buf, size_t len) {
  if (*name == '\0') return ENOENT;
  if (path_var == NULL) path_var = "/usr/local/bin:/usr/bin:/bin";
  int found_denied = 0;
  const char *p = path_var;
  for (;;) {
    const char *end = strchr(p, ':');
    size_t n = end ? (size_t)(end - p) : strlen(p);
    const char *dir = n ? p : ".";
    size_t dn = n ? n : 1;
    if (dn + 1 + strlen(name) < len) {
      memcpy(buf, dir, dn);
      buf[dn] = '/';
      strcpy(buf + dn + 1, name);
      struct stat st;
      if (stat(buf, &st) == 0 && S_ISREG(st.st_mode)) {
        if (access(buf, X_OK) == 0) return 0;
        found_denied = 1;
      }
    }
    if (!end) break;
    p = end + 1;
  }
  return found_denied ? EACCES : ENOENT;
}

/* ---- output ---- */

/* deliver's stack: the callback and the stream name, pushed once per chunk */
enum { D_CALLBACK = 1, D_NAME, D_STREAM, D_DATA, D_LEN };

static int deliver_line(void *ctx, const char *line, size_t len) {
  lua_State *L = ctx;
  lua_pushvalue(L, D_CALLBACK);
  lua_pushlstring(L, line, len);
  lua_pushvalue(L, D_NAME);
  lua_call(L, 2, 0);
  return 0;
}

/* Under lua_pcall: hands each complete line of the chunk to the stream's callback. */
static int deliver(lua_State *L) {
  stream *s = lua_touserdata(L, D_STREAM);
  const char *data = lua_touserdata(L, D_DATA);
  size_t n = (size_t)lua_tointeger(L, D_LEN);
  int rc = data ? ops_linebuf_feed(&s->lines, data, n, deliver_line, L) : ops_linebuf_finish(&s->lines, deliver_line, L);
  if (rc < 0) return luaL_error(L, "out of memory splitting lines");
  return 0;
}

static int traceback(lua_State *L) {
  luaL_traceback(L, L, lua_tostring(L, 1), 1);
  return 1;
}

static void run_callback(stream *s, const char *data, size_t n) {
  proc *p = s->p;
  if (s->cb_ref == LUA_NOREF || p->cb_error_ref != LUA_NOREF) return;
  lua_State *L = ops_main_state();
  lua_pushcfunction(L, traceback);
  lua_pushcfunction(L, deliver);
  lua_rawgeti(L, LUA_REGISTRYINDEX, s->cb_ref);
  lua_pushstring(L, s->name);
  lua_pushlightuserdata(L, s);
  lua_pushlightuserdata(L, (void *)data);
  lua_pushinteger(L, (lua_Integer)n);
  if (lua_pcall(L, 5, 0, -7) != LUA_OK) {
    p->cb_error_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    start_kill(p); /* nobody can take its output any more */
  }
  lua_pop(L, 1);
}

/* opts.on_linger(pid): the child exited drain seconds ago and its pipes are still open. An
 * error in it is the run's, as a line callback's is. */
static void call_linger(proc *p) {
  if (p->linger_ref == LUA_NOREF || p->cb_error_ref != LUA_NOREF || p->done) return;
  lua_State *L = ops_main_state();
  lua_pushcfunction(L, traceback);
  lua_rawgeti(L, LUA_REGISTRYINDEX, p->linger_ref);
  lua_pushinteger(L, p->pid);
  if (lua_pcall(L, 1, 0, -3) != LUA_OK) {
    p->cb_error_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    start_kill(p);
  }
  lua_pop(L, 1);
}

/* A stream that has filled its tail once is read straight into it (no copy: what a long,
 * chatty program costs); until then, and when the tail is small, into readbuf. */
static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  (void)suggested;
  stream *s = (stream *)((char *)h - offsetof(stream, pipe));
  size_t n = sizeof readbuf;
  char *p = s->tail.limit >= MIN_READ ? ops_tailbuf_space(&s->tail, &n) : NULL;
  *buf = p ? uv_buf_init(p, (unsigned)n) : uv_buf_init(readbuf, sizeof readbuf);
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf) {
  stream *s = (stream *)((char *)st - offsetof(stream, pipe));
  if (nread > 0) {
    if (!s->grown && (size_t)nread >= PIPE_GROW_AT) {
      s->grown = 1;
      int fd;
      if (uv_fileno((uv_handle_t *)st, &fd) == 0) fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE);
    }
    if (buf->base == readbuf)
      ops_tailbuf_append(&s->tail, buf->base, (size_t)nread);
    else
      ops_tailbuf_commit(&s->tail, (size_t)nread);
    run_callback(s, buf->base, (size_t)nread);
    return;
  }
  if (nread == 0) return;
  proc *p = s->p;
  run_callback(s, NULL, 0); /* end of stream: the last line without "\n" */
  stop_reading(s);
  if (!p->out.reading && !p->err.reading) reap_if_exited(p);
  maybe_done(p);
}

/* ---- stdin ---- */

static void on_written(uv_write_t *req, int status) {
  proc *p = req->data;
  (void)status; /* a child that does not read its input is not our failure */
  if (p->in_open) {
    p->in_open = 0;
    close_handle(p, (uv_handle_t *)&p->in);
  }
}

/* ---- spawning ---- */

/* Reads a stream option: "capture" | "inherit" | "ignore" | function | {path=, append=}
 * | "stdout" (stderr only). Raises on misuse; opens nothing. */
static int stream_mode(lua_State *L, int opts, const char *key, int *cb_idx, const char **path, int *append) {
  int t = lua_getfield(L, opts, key);
  *cb_idx = 0;
  *path = NULL;
  *append = 0;
  if (t == LUA_TNIL) {
    lua_pop(L, 1);
    return S_CAPTURE;
  }
  if (t == LUA_TFUNCTION) {
    *cb_idx = lua_gettop(L); /* stays on the stack until the handle holds a reference */
    return S_CAPTURE;
  }
  if (t == LUA_TTABLE) {
    lua_getfield(L, -1, "path");
    if (lua_isnil(L, -1)) luaL_error(L, "opts.%s: a file target needs a 'path' string", key);
    const char *what = lua_pushfstring(L, "opts.%s.path", key);
    *path = ops_path_field(L, -2, what); /* anchored by the options table */
    lua_pop(L, 1); /* what */
    lua_getfield(L, -2, "append");
    *append = lua_toboolean(L, -1);
    lua_pop(L, 3);
    return S_FILE;
  }
  const char *m = lua_tostring(L, -1);
  int mode = -1;
  if (m && strcmp(m, "capture") == 0) mode = S_CAPTURE;
  if (m && strcmp(m, "inherit") == 0) mode = S_INHERIT;
  if (m && strcmp(m, "ignore") == 0) mode = S_IGNORE;
  if (m && strcmp(m, "stdout") == 0 && strcmp(key, "stderr") == 0) mode = S_MERGE;
  if (mode < 0) luaL_error(L, "opts.%s: expected \"capture\", \"inherit\", \"ignore\", a function or {path=...}%s", key,
                           strcmp(key, "stderr") == 0 ? " or \"stdout\"" : "");
  lua_pop(L, 1);
  return mode;
}

static int open_output(const char *path, int append) {
  return open(path, O_WRONLY | O_CREAT | O_CLOEXEC | (append ? O_APPEND : O_TRUNC), 0644);
}

static double opt_number(lua_State *L, int opts, const char *key, double dflt) {
  lua_getfield(L, opts, key);
  double v = luaL_optnumber(L, -1, dflt);
  lua_pop(L, 1);
  return v;
}

static void stream_init(proc *p, stream *s, const char *name, size_t limit) {
  s->p = p;
  s->name = name;
  s->cb_ref = LUA_NOREF;
  ops_linebuf_init(&s->lines, MAX_LINE);
  ops_tailbuf_init(&s->tail, limit);
}

/* proc.spawn(argv, opts) -> handle | nil, err, code */
/* An opts.env entry: a name and its value (NULL: unset it), from layer `layer`; hash is
 * its name's hash. */
typedef struct {
  const char *name, *value;
  size_t name_len, value_len;
  int layer;
  uint32_t hash;
  uint64_t prefix; /* name_prefix */
} env_var;

/* A name's first 8 bytes as a big-endian number (zeros after a shorter name's end): two
 * names whose prefixes differ compare as their prefixes do. */
static uint64_t name_prefix(const char *s, size_t n) {
  unsigned char b[8] = {0};
  memcpy(b, s, n < 8 ? n : 8);
  return (uint64_t)b[0] << 56 | (uint64_t)b[1] << 48 | (uint64_t)b[2] << 40 | (uint64_t)b[3] << 32 |
         (uint64_t)b[4] << 24 | (uint64_t)b[5] << 16 | (uint64_t)b[6] << 8 | (uint64_t)b[7];
}

static int env_var_cmp(const void *a, const void *b) {
  const env_var *x = a, *y = b;
  if (x->prefix != y->prefix) return x->prefix < y->prefix ? -1 : 1;
  size_t n = x->name_len < y->name_len ? x->name_len : y->name_len;
  int c = n > 8 ? memcmp(x->name + 8, y->name + 8, n - 8) : 0;
  if (c) return c;
  return x->name_len < y->name_len ? -1 : x->name_len > y->name_len;
}

/* A name's hash, for the table where inherited variables are looked up: its length, its
 * first and its last 8 bytes (variables' names are short, and differ at one end or the
 * other; those that collide are told apart by comparing them whole). */
static uint32_t name_hash(const char *s, size_t n) {
  uint64_t a = 0, b = 0;
  memcpy(&a, s, n < 8 ? n : 8);
  if (n > 8) memcpy(&b, s + n - (n < 16 ? n - 8 : 8), n < 16 ? n - 8 : 8);
  uint64_t h = (a * 0x9E3779B97F4A7C15u) ^ (b * 0xC2B2AE3D27D4EB4Fu) ^ n;
  return (uint32_t)(h >> 32) ^ (uint32_t)h;
}

/* The opts.env entry named name (slots: an open-addressing table of nslots, a power of
 * two, holding 1 + an index into vars, 0 for empty), or NULL. */
static env_var *env_find(env_var *vars, const uint32_t *slots, size_t nslots, const char *name, size_t len,
                         uint32_t h) {
  for (size_t i = h & (nslots - 1);; i = (i + 1) & (nslots - 1)) {
    if (slots[i] == 0) return NULL;
    env_var *v = &vars[slots[i] - 1];
    if (v->hash == h && v->name_len == len && memcmp(v->name, name, len) == 0) return v;
  }
}

static int l_spawn(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  if (lua_isnoneornil(L, 2)) {
    lua_settop(L, 1);
    lua_newtable(L);
  }
  luaL_checktype(L, 2, LUA_TTABLE);
  lua_settop(L, 2);
  int argc = (int)luaL_len(L, 1);
  if (argc < 1) return luaL_argerror(L, 1, "argv needs at least the program");
  lua_newtable(L); /* 3: anchors for every string we pass to C */
  int anchors = 3, nanchor = 0;
  char **args = lua_newuserdatauv(L, sizeof(char *) * ((size_t)argc + 1), 0);
  lua_rawseti(L, anchors, ++nanchor);
  for (int i = 1; i <= argc; i++) {
    lua_rawgeti(L, 1, i);
    if (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER)
      return luaL_argerror(L, 1, lua_pushfstring(L, "argv[%d] is a %s, not a string", i, luaL_typename(L, -1)));
    int converted = lua_type(L, -1) == LUA_TNUMBER;
    args[i - 1] = (char *)lua_tostring(L, -1);
    if (strlen(args[i - 1]) != lua_rawlen(L, -1))
      return luaL_argerror(L, 1, lua_pushfstring(L, "argv[%d] contains a NUL byte", i));
    if (converted)
      lua_rawseti(L, anchors, ++nanchor); /* a new string: kept alive here */
    else
      lua_pop(L, 1); /* a string of argv: argv keeps it alive */
  }
  args[argc] = NULL;

  /* environment: the table's entries (or its layers') sorted by name, so that each
   * inherited variable is looked up in them by binary search; "NAME=value" strings built in
   * one block (no Lua string per variable: a deploy passes ~40 to every command) */
  char **env = NULL;
  const char *env_path = NULL; /* with env: its PATH */
  lua_getfield(L, 2, "env");
  if (!lua_isnil(L, -1)) {
    luaL_argcheck(L, lua_istable(L, -1), 2, "opts.env must be a table");
    int envt = lua_gettop(L);
    lua_getfield(L, 2, "env_replace");
    int replace = lua_toboolean(L, -1);
    lua_pop(L, 1);
    env_var small[128], *vars = small;
    size_t nt = 0, cap = sizeof small / sizeof small[0], ne = 0, bytes = 0;
    /* a list of tables: layers, a later one's value winning (no merged table to build) */
    int nlayers = 0, layered = lua_rawgeti(L, envt, 1) == LUA_TTABLE;
    lua_pop(L, 1);
    if (layered) {
      nlayers = (int)lua_rawlen(L, envt);
      lua_pushnil(L);
      while (lua_next(L, envt)) { /* a list: nothing but its items */
        if (!lua_isinteger(L, -2) || lua_tointeger(L, -2) < 1 || lua_tointeger(L, -2) > nlayers)
          return luaL_argerror(L, 2, "opts.env: a list of tables of variables, or one table of variables, not both");
        lua_pop(L, 1);
      }
      luaL_checkstack(L, nlayers + 4, "opts.env layers");
      for (int li = 1; li <= nlayers; li++)
        if (lua_rawgeti(L, envt, li) != LUA_TTABLE) /* each stays on the stack */
          return luaL_argerror(L, 2, lua_pushfstring(L, "opts.env[%d] must be a table of variables", li));
    } else {
      lua_pushvalue(L, envt);
      nlayers = 1;
    }
    int first_layer = lua_gettop(L) - nlayers + 1;
    for (int li = 0; li < nlayers; li++) {
      int lt = first_layer + li;
      lua_pushnil(L);
      while (lua_next(L, lt)) {
        if (lua_type(L, -2) != LUA_TSTRING) return luaL_argerror(L, 2, "opts.env keys must be strings");
        int vt = lua_type(L, -1);
        if (vt != LUA_TSTRING && vt != LUA_TNUMBER && !(vt == LUA_TBOOLEAN && !lua_toboolean(L, -1)))
          return luaL_argerror(L, 2, lua_pushfstring(L, "opts.env.%s must be a string (or false to unset)", lua_tostring(L, -2)));
        if (nt == cap) { /* more than fit on the stack: a bigger array, kept alive by the anchors */
          env_var *grown = lua_newuserdatauv(L, 2 * cap * sizeof *grown, 0);
          memcpy(grown, vars, nt * sizeof *vars);
          lua_rawseti(L, anchors, ++nanchor);
          vars = grown;
          cap *= 2;
        }
        env_var *v = &vars[nt++];
        v->name = lua_tolstring(L, -2, &v->name_len); /* a string key: anchored by its table */
        v->value = NULL;
        v->value_len = 0;
        v->layer = li;
        if (vt == LUA_TNUMBER) {
          lua_pushvalue(L, -1);
          v->value = lua_tolstring(L, -1, &v->value_len); /* a new string: anchored */
          lua_rawseti(L, anchors, ++nanchor);
        } else if (vt == LUA_TSTRING) {
          v->value = lua_tolstring(L, -1, &v->value_len);
        }
        /* NAME=value in one string: a name with '=' would set another variable, a NUL would
         * end it early (the child would see a cut name or value, and say nothing) */
        if (v->name_len == 0 || memchr(v->name, '=', v->name_len) || memchr(v->name, '\0', v->name_len))
          return luaL_argerror(L, 2, lua_pushfstring(L, "opts.env: '%s' is not a variable name (empty, or with '=' or a NUL byte)", v->name));
        if (v->value && memchr(v->value, '\0', v->value_len))
          return luaL_argerror(L, 2, lua_pushfstring(L, "opts.env.%s contains a NUL byte", v->name));
        if (v->value) bytes += v->name_len + v->value_len + 2;
        lua_pop(L, 1);
      }
    }
    lua_settop(L, envt); /* the layers stay alive in opts.env */
    /* a name set by several layers: the last layer's entry (the layers were read in order);
     * the names in a table of hashes, where each inherited variable is looked up */
    size_t nslots = 64;
    while (nslots < 2 * nt) nslots *= 2;
    uint32_t small_slots[256], *slots = small_slots;
    if (nslots > sizeof small_slots / sizeof small_slots[0]) {
      slots = lua_newuserdatauv(L, nslots * sizeof *slots, 0);
      lua_rawseti(L, anchors, ++nanchor);
    }
    memset(slots, 0, nslots * sizeof *slots);
    size_t live_n = 0;
    for (size_t i = 0; i < nt; i++) {
      env_var *v = &vars[i];
      v->hash = name_hash(v->name, v->name_len);
      size_t at = v->hash & (nslots - 1);
      while (slots[at] != 0) {
        env_var *o = &vars[slots[at] - 1];
        if (o->hash == v->hash && o->name_len == v->name_len && memcmp(o->name, v->name, v->name_len) == 0) break;
        at = (at + 1) & (nslots - 1);
      }
      if (slots[at] != 0) { /* an earlier layer's: this one wins */
        env_var *o = &vars[slots[at] - 1];
        if (o->value) bytes -= o->name_len + o->value_len + 2;
        o->layer = -1;
      } else {
        live_n++;
      }
      slots[at] = (uint32_t)i + 1;
    }
    /* the entries that count, sorted by name (as the child's environment lists them) into
     * an array of their own: the table of hashes keeps indexing vars */
    env_var small_sorted[128], *sorted = small_sorted;
    if (live_n > sizeof small_sorted / sizeof small_sorted[0]) {
      sorted = lua_newuserdatauv(L, live_n * sizeof *sorted, 0);
      lua_rawseti(L, anchors, ++nanchor);
    }
    size_t ns = 0;
    for (size_t i = 0; i < nt; i++) {
      if (vars[i].layer < 0) continue;
      env_var x = vars[i];
      x.prefix = name_prefix(x.name, x.name_len);
      size_t j = ns++;
      while (j > 0 && env_var_cmp(&sorted[j - 1], &x) > 0) { /* insertion sort: a few dozen */
        sorted[j] = sorted[j - 1];
        j--;
      }
      sorted[j] = x;
    }
    for (char **e = environ; e && *e; e++) ne++;
    /* the pointers, then the strings they point to, in one block: the child's execve
     * copies them, so one block serves every spawn (no garbage for the collector) */
    size_t need = sizeof(char *) * (ne + ns + 1) + bytes;
    if (need > env_block_size) {
      size_t size = env_block_size ? env_block_size : 4096;
      while (size < need) size *= 2;
      void *grown = realloc(env_block, size);
      if (grown == NULL) return luaL_error(L, "out of memory");
      env_block = grown;
      env_block_size = size;
    }
    env = env_block;
    char *block = (char *)(env + ne + ns + 1);
    size_t k = 0;
    env_path = NULL; /* the PATH the child gets, where the program is looked for */
    if (!replace) {
      for (char **e = environ; e && *e; e++) {
        const char *eq = strchr(*e, '=');
        if (eq == NULL) continue;
        size_t len = (size_t)(eq - *e);
        /* set (or unset) by the table: the table's entry wins */
        if (env_find(vars, slots, nslots, *e, len, name_hash(*e, len))) continue;
        env[k++] = *e;
        if (len == 4 && memcmp(*e, "PATH", 4) == 0) env_path = eq + 1;
      }
    }
    for (size_t i = 0; i < ns; i++) {
      if (!sorted[i].value) continue; /* false: unset */
      env[k++] = block;
      if (sorted[i].name_len == 4 && memcmp(sorted[i].name, "PATH", 4) == 0) env_path = block + 5;
      memcpy(block, sorted[i].name, sorted[i].name_len);
      block += sorted[i].name_len;
      *block++ = '=';
      memcpy(block, sorted[i].value, sorted[i].value_len);
      block += sorted[i].value_len;
      *block++ = '\0';
    }
    env[k] = NULL;
  }
  lua_pop(L, 1);

  lua_getfield(L, 2, "cwd");
  const char *cwd = lua_isnil(L, -1) ? NULL : ops_path_field(L, -1, "opts.cwd");
  lua_pop(L, 1); /* the options table anchors it; the child's chdir checks it */

  int out_cb, err_cb, out_append, err_append, out_fd = -1, err_fd = -1;
  const char *out_path, *err_path;
  int out_mode = stream_mode(L, 2, "stdout", &out_cb, &out_path, &out_append);
  int err_mode = stream_mode(L, 2, "stderr", &err_cb, &err_path, &err_append);
  double limit_n = opt_number(L, 2, "capture_limit", DEFAULT_CAPTURE);
  if (!(limit_n >= 0) || limit_n > 1024.0 * 1024 * 1024)
    return luaL_argerror(L, 2, "opts.capture_limit must be from 0 to 1 GiB");
  size_t limit = (size_t)limit_n;
  double timeout = opt_number(L, 2, "timeout", 0);
  double grace = opt_number(L, 2, "grace", 5);
  double drain = opt_number(L, 2, "drain", 2);
  int stdin_type = lua_getfield(L, 2, "stdin");
  if (stdin_type == LUA_TSTRING && lua_rawlen(L, -1) >= UINT32_MAX)
    return luaL_argerror(L, 2, "opts.stdin: a string under 4 GiB (give a bigger input as {path = ...})");
  if (stdin_type == LUA_TTABLE) {
    lua_getfield(L, -1, "path");
    if (lua_isnil(L, -1)) return luaL_argerror(L, 2, "opts.stdin: a file source needs a 'path' string");
    ops_path_field(L, -1, "opts.stdin.path"); /* here: below, an error would leak the proc */
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  int linger_type = lua_getfield(L, 2, "on_linger"); /* stays on the stack until it is referenced */
  if (linger_type != LUA_TNIL && linger_type != LUA_TFUNCTION)
    return luaL_argerror(L, 2, "opts.on_linger must be a function");
  int linger_idx = lua_gettop(L);
  /* nothing below raises, but for lack of memory */
  proc *p = calloc(1, sizeof *p);
  if (p == NULL) return luaL_error(L, "out of memory");
  p->cb_error_ref = p->in_ref = p->linger_ref = LUA_NOREF;
  if (linger_type == LUA_TFUNCTION) {
    lua_pushvalue(L, linger_idx);
    p->linger_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  stream_init(p, &p->out, "stdout", limit);
  stream_init(p, &p->err, "stderr", limit);
  p->timeout = timeout;
  p->grace = grace;
  p->drain = drain;
  p->out.mode = out_mode;
  p->err.mode = err_mode;
  if (out_mode == S_FILE) out_fd = open_output(out_path, out_append);
  if (err_mode == S_FILE && !(out_mode == S_FILE && out_fd < 0)) err_fd = open_output(err_path, err_append);
  if ((p->out.mode == S_FILE && out_fd < 0) || (p->err.mode == S_FILE && err_fd < 0)) {
    int e = errno;
    const char *path = p->out.mode == S_FILE && out_fd < 0 ? out_path : err_path;
    if (out_fd >= 0) close(out_fd);
    if (err_fd >= 0) close(err_fd);
    proc_free(p);
    lua_pushnil(L);
    lua_pushfstring(L, "%s: cannot open output file %s: %s", args[0], path, strerror(e));
    lua_pushstring(L, uv_err_name(-e));
    return 3;
  }

  /* child_fd[i]: what becomes the child's fd i (-1: /dev/null) */
  int child_fd[3] = {-1, -1, -1};
  int in_fd = -1;
  const char *in_data = NULL;
  size_t in_len = 0;
  int t = lua_getfield(L, 2, "stdin");
  if (t == LUA_TSTRING && strcmp(lua_tostring(L, -1), "inherit") == 0) {
    child_fd[0] = 0; /* ours (the word itself as input: "inherit\n", or a file) */
    lua_pop(L, 1);
  } else if (t == LUA_TSTRING) {
    in_data = lua_tolstring(L, -1, &in_len);
    p->in_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  } else if (t == LUA_TTABLE) {
    lua_getfield(L, -1, "path");
    const char *path = lua_tostring(L, -1); /* a string without NUL: checked above */
    in_fd = open(path, O_RDONLY | O_CLOEXEC);
    if (in_fd < 0) {
      int e = errno;
      if (out_fd >= 0) close(out_fd);
      if (err_fd >= 0) close(err_fd);
      proc_free(p);
      lua_pushnil(L);
      lua_pushfstring(L, "%s: cannot open input file %s: %s", args[0], path, strerror(e));
      lua_pushstring(L, uv_err_name(-e));
      return 3;
    }
    lua_pop(L, 2);
    child_fd[0] = in_fd;
  } else {
    lua_pop(L, 1); /* nil: /dev/null */
  }
  int fds_in[2] = {-1, -1}, fds_out[2] = {-1, -1}, fds_err[2] = {-1, -1};
  int pipe_failed = 0;
  /* both ends blocking: uv_pipe_open makes ours non-blocking, the child's stays as it expects */
  if (in_data) {
    if (uv_pipe(fds_in, 0, 0) != 0) pipe_failed = 1;
    child_fd[0] = fds_in[0];
  }
  stream *ss[2] = {&p->out, &p->err};
  int *fds[2] = {fds_out, fds_err};
  int file_fd[2] = {out_fd, err_fd};
  for (int i = 0; i < 2; i++) {
    switch (ss[i]->mode) {
      case S_CAPTURE:
        if (uv_pipe(fds[i], 0, 0) != 0) pipe_failed = 1;
        child_fd[i + 1] = fds[i][1];
        break;
      case S_INHERIT: child_fd[i + 1] = i + 1; break;
      case S_IGNORE: break;
      case S_FILE: child_fd[i + 1] = file_fd[i]; break;
      case S_MERGE: child_fd[2] = child_fd[1] >= 0 ? child_fd[1] : -2; break;
    }
  }

  /* the program, found in the PATH the child gets */
  const char *path_var = env ? env_path : getenv("PATH");
  char found[4096];
  const char *program = args[0]; /* a path: execve's ENOENT or EACCES says what is wrong */
  int rc = pipe_failed ? EMFILE : 0, cwd_failed = 0;
  if (rc == 0 && strchr(program, '/') == NULL) {
    rc = find_program(args[0], path_var, found, sizeof found);
    program = found;
  }
  if (rc == 0 && devnull < 0 && (child_fd[0] == -1 || child_fd[1] == -1 || child_fd[2] == -1)) {
    devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (devnull < 0) rc = errno;
  }
  if (rc == 0) {
    rc = watch_children();
    if (rc != 0) rc = -rc;
  }
  if (rc == 0) {
    int dup_from[3];
    for (int i = 0; i < 3; i++) {
      dup_from[i] = child_fd[i] == -2 ? 1 /* merged into a stdout that is /dev/null */
                    : child_fd[i] < 0 ? devnull : child_fd[i];
    }
    p->start = uv_hrtime();
    pid_t pid;
    rc = start_child(program, args, env ? env : environ, dup_from, cwd, &pid, &cwd_failed);
    if (rc == 0) p->pid = pid;
  }
  /* the child has its copies now (or never will) */
  int child_ends[] = {fds_in[0], fds_out[1], fds_err[1], in_fd, out_fd, err_fd};
  for (size_t i = 0; i < sizeof child_ends / sizeof *child_ends; i++)
    if (child_ends[i] >= 0) close(child_ends[i]);
  if (rc != 0) {
    int ours[] = {fds_in[1], fds_out[0], fds_err[0]};
    for (size_t i = 0; i < 3; i++)
      if (ours[i] >= 0) close(ours[i]);
    proc_free(p);
    lua_pushnil(L);
    if (!cwd_failed && cwd && rc > 0) { /* failed before the child's chdir: a missing cwd says more */
      struct stat st;
      if (stat(cwd, &st) != 0 || !S_ISDIR(st.st_mode)) {
        cwd_failed = 1;
        rc = ENOENT;
      }
    }
    if (cwd_failed && (rc == ENOENT || rc == ENOTDIR)) {
      lua_pushfstring(L, "%s: cannot run in %s: no such directory", args[0], cwd);
      lua_pushliteral(L, "ENOENT");
      return 3;
    }
    if (cwd_failed)
      lua_pushfstring(L, "%s: cannot run in %s: %s", args[0], cwd, strerror(rc));
    else if (rc == ENOENT)
      lua_pushfstring(L, "%s: command not found", args[0]);
    else if (rc == EACCES)
      lua_pushfstring(L, "%s: permission denied (is it executable?)", args[0]);
    else if (rc < 0)
      lua_pushfstring(L, "%s: cannot watch children: %s", args[0], uv_strerror(rc));
    else
      lua_pushfstring(L, "%s: cannot run: %s", args[0], strerror(rc));
    lua_pushstring(L, rc < 0 ? uv_err_name(rc) : strerrorname_np(rc)); /* libuv has no ENOEXEC */
    return 3;
  }
  if (running++ == 0) uv_ref((uv_handle_t *)&sigchld);
  p->handles = 2; /* the child + the timer */
  uv_timer_init(ops_loop(), &p->timer);
  p->timer.data = p;
  p->next = live;
  if (live) live->prev = p;
  live = p;
  live_count++;
  p->in_live = 1;

  int cbs[2] = {out_cb, err_cb};
  for (int i = 0; i < 2; i++) {
    stream *s = ss[i];
    if (s->mode != S_CAPTURE) continue;
    uv_pipe_init(ops_loop(), &s->pipe, 0);
    s->pipe.data = p;
    p->handles++;
    uv_pipe_open(&s->pipe, fds[i][0]);
    s->reading = 1;
    uv_read_start((uv_stream_t *)&s->pipe, on_alloc, on_read);
    if (cbs[i]) {
      lua_pushvalue(L, cbs[i]);
      s->cb_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
  }
  if (in_data) {
    uv_pipe_init(ops_loop(), &p->in, 0);
    p->in.data = p;
    p->handles++;
    uv_pipe_open(&p->in, fds_in[1]);
    p->in_open = 1;
    uv_buf_t b = uv_buf_init((char *)in_data, (unsigned)in_len);
    p->wreq.data = p;
    if (uv_write(&p->wreq, (uv_stream_t *)&p->in, &b, 1, on_written) != 0) {
      p->in_open = 0;
      close_handle(p, (uv_handle_t *)&p->in);
    }
  }
  if (p->timeout > 0) uv_timer_start(&p->timer, on_timer, ms_of(p->timeout), 0);

  proc_ud *ud = lua_newuserdatauv(L, sizeof *ud, 0);
  ud->p = p;
  p->ud = ud;
  p->handles++; /* the Lua handle keeps the struct, and so the result, alive */
  luaL_setmetatable(L, PROC_MT);
  return 1;
}

static proc_ud *check_ud(lua_State *L) { return luaL_checkudata(L, 1, PROC_MT); }

static void wait_cancel(ops_wait *w) {
  proc *p = (proc *)((char *)w - offsetof(proc, w));
  start_kill(p); /* the task that waited is gone: the child goes too */
}

/* handle:wait() -> result | nil, err  (err: what a line callback raised) */
static int l_wait(lua_State *L) {
  proc_ud *ud = check_ud(L);
  proc *p = ud->p;
  if (p == NULL) return luaL_error(L, "this process handle is closed");
  if (p->done) {
    if (p->cb_error_ref != LUA_NOREF) {
      lua_pushnil(L);
      lua_rawgeti(L, LUA_REGISTRYINDEX, p->cb_error_ref);
      return 2;
    }
    push_result(L, p);
    return 1;
  }
  ops_check_task(L, "proc:wait");
  if (ops_wait_thread(&p->w) != NULL) return luaL_error(L, "another task is already waiting for this process");
  p->w.cancel = wait_cancel;
  return ops_wait_begin(L, &p->w, -1);
}

/* handle:kill([signal]) -> true | false : signals the whole process group; "SIGTERM" by
 * default starts the TERM, grace, KILL sequence */
static int l_kill(lua_State *L) {
  proc_ud *ud = check_ud(L);
  const char *sig = luaL_optstring(L, 2, NULL);
  proc *p = ud->p;
  if (p == NULL || p->exited) {
    lua_pushboolean(L, 0);
    return 1;
  }
  if (sig == NULL) {
    start_kill(p);
  } else {
    int num = strcmp(sig, "SIGKILL") == 0 ? SIGKILL
              : strcmp(sig, "SIGTERM") == 0 ? SIGTERM
              : strcmp(sig, "SIGINT") == 0 ? SIGINT
              : strcmp(sig, "SIGHUP") == 0 ? SIGHUP
                                           : 0;
    if (num == 0) return luaL_argerror(L, 2, "expected SIGTERM, SIGKILL, SIGINT or SIGHUP");
    kill(-p->pid, num);
  }
  lua_pushboolean(L, 1);
  return 1;
}

static int l_index(lua_State *L) {
  proc_ud *ud = check_ud(L);
  const char *k = luaL_checkstring(L, 2);
  if (strcmp(k, "pid") == 0) {
    if (ud->p == NULL) return 0;
    lua_pushinteger(L, ud->p->pid);
    return 1;
  }
  lua_getmetatable(L, 1);
  lua_getfield(L, -1, "methods");
  lua_getfield(L, -1, k);
  return 1;
}

static int l_gc(lua_State *L) {
  proc_ud *ud = check_ud(L);
  proc *p = ud->p;
  ud->p = NULL;
  if (p == NULL) return 0;
  p->ud = NULL; /* the child runs on; its struct goes when it ends */
  if (--p->handles == 0) proc_free(p);
  return 0;
}

static int l_tostring(lua_State *L) {
  proc_ud *ud = check_ud(L);
  if (ud->p)
    lua_pushfstring(L, "process %d", (int)ud->p->pid);
  else
    lua_pushliteral(L, "process (ended)");
  return 1;
}

int luaopen_ops_core_proc(lua_State *L) {
  static const luaL_Reg methods[] = {{"wait", l_wait}, {"kill", l_kill}, {NULL, NULL}};
  static const luaL_Reg funcs[] = {{"spawn", l_spawn}, {NULL, NULL}};
  if (luaL_newmetatable(L, PROC_MT)) {
    luaL_newlib(L, methods);
    lua_setfield(L, -2, "methods");
    lua_pushcfunction(L, l_index);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, l_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, l_tostring);
    lua_setfield(L, -2, "__tostring");
  }
  lua_pop(L, 1);
  luaL_newlib(L, funcs);
  return 1;
}
