/*
 * fs.sync_tree: makes one directory tree an exact copy of another, as `cp -a` would make
 * it, doing only the work that differs: a file whose content, mode, owner and mtime match
 * is left alone, a file that differs is replaced, an entry the source does not have is
 * removed. On a disk where creating a file is what costs (ext4 checks every recently
 * deleted inode before it reuses one), bringing a kept copy up to date creates nothing.
 *
 * It runs on libuv's thread pool (the loop goes on meanwhile) with *at() calls relative
 * to directories it opened itself: nothing in the destination is followed (O_NOFOLLOW,
 * AT_SYMLINK_NOFOLLOW), so a symlink planted in the copy cannot send a write outside it.
 * Copied: directories, regular files (content, mode bits, mtime, and owner when run as
 * root) and symlinks (their target text verbatim). A fifo, socket or device in the source
 * is an error (ENOTSUP), as is anything the source cannot read.
 */
#define _GNU_SOURCE

#include <dirent.h>
#include <stddef.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <lauxlib.h>

#include "opsrun.h"
#include "treesync.h"

#define SYNC_CHUNK (64 * 1024)

typedef struct {
	uv_work_t req;
	ops_wait w;
	char *src, *dst;
	int cancelled; /* set by the loop thread, read by the worker (__atomic) */
	uv_mutex_t mu;
	uv_cond_t cv;
	int finished;  /* the worker is done with the trees (under mu) */
	int as_root;
	char *buf_a, *buf_b;
	/* the outcome */
	int err;
	const char *side; /* which root `rel` is under when err is set */
	char rel[PATH_MAX];
	size_t rel_len;
	long copied, removed, same;
} tree_sync;

/* ---- the worker ---- */

static int stop_requested(tree_sync *t)
{
	return __atomic_load_n(&t->cancelled, __ATOMIC_RELAXED);
}

/* Appends "/name" to t->rel; the previous length is returned for restore(). */
static int push_name(tree_sync *t, const char *name, size_t *saved)
{
	size_t n = strlen(name);
	*saved = t->rel_len;
	if (t->rel_len + 1 + n >= sizeof t->rel)
		return ENAMETOOLONG;
	t->rel[t->rel_len] = '/';
	memcpy(t->rel + t->rel_len + 1, name, n + 1);
	t->rel_len += 1 + n;
	return 0;
}

static void pop_name(tree_sync *t, size_t saved)
{
	t->rel_len = saved;
	t->rel[saved] = '\0';
}

static int fail(tree_sync *t, int err, const char *side)
{
	t->err = err;
	t->side = side;
	return err;
}

static int is_dot(const char *name)
{
	return name[0] == '.' && (name[1] == '\0' || (name[1] == '.' && name[2] == '\0'));
}

static int same_time(const struct timespec *a, const struct timespec *b)
{
	return a->tv_sec == b->tv_sec && a->tv_nsec == b->tv_nsec;
}

/* Removes the entry name of dfd (a directory with all it holds; a symlink, not followed). */
static int remove_entry(tree_sync *t, int dfd, const char *name, int is_dir)
{
	if (is_dir) {
		char path[PATH_MAX];
		int cfd = openat(dfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
		int err;
		if (cfd < 0)
			return fail(t, errno, t->dst);
		snprintf(path, sizeof path, "%s", t->rel);
		err = ops_fs_remove_contents(cfd, path, strlen(path), sizeof path);
		if (err) {
			snprintf(t->rel, sizeof t->rel, "%s", path);
			return fail(t, err, t->dst);
		}
		if (unlinkat(dfd, name, AT_REMOVEDIR) != 0)
			return fail(t, errno, t->dst);
	} else if (unlinkat(dfd, name, 0) != 0) {
		return fail(t, errno, t->dst);
	}
	t->removed++;
	return 0;
}

static int read_full(int fd, char *buf, size_t len, size_t *got)
{
	*got = 0;
	while (*got < len) {
		ssize_t n = read(fd, buf + *got, len - *got);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return errno;
		}
		if (n == 0)
			break;
		*got += (size_t)n;
	}
	return 0;
}

/* 1 when the regular files name of sfd and dfd hold the same bytes, 0 when not, -1 on an
 * error (set in t). The destination is opened without following a symlink. */
static int same_content(tree_sync *t, int sfd, int dfd, const char *name)
{
	int a = openat(sfd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC), b, same = 1;
	if (a < 0) {
		fail(t, errno, t->src);
		return -1;
	}
	b = openat(dfd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
	if (b < 0) { /* unreadable copy: replace it */
		close(a);
		return 0;
	}
	for (;;) {
		size_t na, nb;
		int err = read_full(a, t->buf_a, SYNC_CHUNK, &na);
		if (err) {
			fail(t, err, t->src);
			same = -1;
			break;
		}
		if (read_full(b, t->buf_b, SYNC_CHUNK, &nb) != 0 || na != nb ||
		    memcmp(t->buf_a, t->buf_b, na) != 0) {
			same = 0;
			break;
		}
		if (na < SYNC_CHUNK)
			break;
	}
	close(a);
	close(b);
	return same;
}

/* 1 when the destination's lstat already shows the source's mode bits, owner (as root)
 * and mtime: nothing to fix, no need to open it. */
static int meta_same(const tree_sync *t, const struct stat *ss, const struct stat *ds)
{
	return (!t->as_root || (ds->st_uid == ss->st_uid && ds->st_gid == ss->st_gid)) &&
	       (ds->st_mode & 07777) == (ss->st_mode & 07777) && same_time(&ds->st_mtim, &ss->st_mtim);
}

/* Gives the open destination fd the source's mode bits, owner (as root) and mtime where
 * they differ. */
static int fix_meta(tree_sync *t, int fd, const struct stat *ss)
{
	struct stat ds;
	int chowned = 0;
	if (fstat(fd, &ds) != 0)
		return fail(t, errno, t->dst);
	if (t->as_root && (ds.st_uid != ss->st_uid || ds.st_gid != ss->st_gid)) {
		if (fchown(fd, ss->st_uid, ss->st_gid) != 0)
			return fail(t, errno, t->dst);
		chowned = 1;
	}
	/* after fchown, which may clear set-id bits */
	if ((ds.st_mode & 07777) != (ss->st_mode & 07777) || chowned)
		if (fchmod(fd, ss->st_mode & 07777) != 0)
			return fail(t, errno, t->dst);
	if (!same_time(&ds.st_mtim, &ss->st_mtim)) {
		struct timespec ts[2] = {{.tv_sec = 0, .tv_nsec = UTIME_OMIT}, ss->st_mtim};
		if (futimens(fd, ts) != 0)
			return fail(t, errno, t->dst);
	}
	return 0;
}

static int copy_file(tree_sync *t, int sfd, int dfd, const char *name, const struct stat *ss)
{
	int in = openat(sfd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC), out, err = 0;
	if (in < 0)
		return fail(t, errno, t->src);
	out = openat(dfd, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (out < 0) {
		err = errno;
		close(in);
		return fail(t, err, t->dst);
	}
	for (;;) {
		size_t n, off = 0;
		err = read_full(in, t->buf_a, SYNC_CHUNK, &n);
		if (err) {
			fail(t, err, t->src);
			break;
		}
		while (off < n) {
			ssize_t w = write(out, t->buf_a + off, n - off);
			if (w < 0) {
				if (errno == EINTR)
					continue;
				err = fail(t, errno, t->dst);
				break;
			}
			off += (size_t)w;
		}
		if (err || n < SYNC_CHUNK)
			break;
	}
	if (!err)
		err = fix_meta(t, out, ss);
	close(in);
	if (close(out) != 0 && !err)
		err = fail(t, errno, t->dst);
	if (err)
		unlinkat(dfd, name, 0);
	else
		t->copied++;
	return err;
}

static int read_link(int dirfd, const char *name, char *buf, size_t cap)
{
	ssize_t n = readlinkat(dirfd, name, buf, cap - 1);
	if (n < 0)
		return -1;
	if ((size_t)n >= cap - 1) {
		errno = ENAMETOOLONG;
		return -1;
	}
	buf[n] = '\0';
	return 0;
}

static int sync_link(tree_sync *t, int sfd, int dfd, const char *name, const struct stat *ss,
		     const struct stat *ds)
{
	char target[PATH_MAX], have[PATH_MAX];
	struct timespec ts[2] = {{.tv_sec = 0, .tv_nsec = UTIME_OMIT}, ss->st_mtim};
	if (read_link(sfd, name, target, sizeof target) != 0)
		return fail(t, errno, t->src);
	if (ds && S_ISLNK(ds->st_mode) && read_link(dfd, name, have, sizeof have) == 0 &&
	    strcmp(have, target) == 0 && (!t->as_root || (ds->st_uid == ss->st_uid && ds->st_gid == ss->st_gid))) {
		if (!same_time(&ds->st_mtim, &ss->st_mtim))
			utimensat(dfd, name, ts, AT_SYMLINK_NOFOLLOW); /* best effort, as cp -a */
		t->same++;
		return 0;
	}
	if (ds && remove_entry(t, dfd, name, S_ISDIR(ds->st_mode)) != 0)
		return t->err;
	if (symlinkat(target, dfd, name) != 0)
		return fail(t, errno, t->dst);
	if (t->as_root && fchownat(dfd, name, ss->st_uid, ss->st_gid, AT_SYMLINK_NOFOLLOW) != 0)
		return fail(t, errno, t->dst);
	utimensat(dfd, name, ts, AT_SYMLINK_NOFOLLOW);
	t->copied++;
	return 0;
}

static int sync_dir(tree_sync *t, int sfd, int dfd);

static int sync_subdir(tree_sync *t, int sfd, int dfd, const char *name, const struct stat *ss,
		       const struct stat *ds)
{
	int csfd, cdfd, err;
	if (ds && !S_ISDIR(ds->st_mode)) {
		if (remove_entry(t, dfd, name, 0) != 0)
			return t->err;
		ds = NULL;
	}
	if (!ds) {
		if (mkdirat(dfd, name, 0700) != 0)
			return fail(t, errno, t->dst);
		t->copied++;
	}
	csfd = openat(sfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (csfd < 0)
		return fail(t, errno, t->src);
	cdfd = openat(dfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (cdfd < 0) {
		err = errno;
		close(csfd);
		return fail(t, err, t->dst);
	}
	/* a folder made read-only (by the source's mode, or a run) is opened up while its
	 * entries are brought in line; fix_meta gives it its mode back */
	int opened = ds && (ds->st_mode & 0700) != 0700;
	if (opened && fchmod(cdfd, (ds->st_mode & 07777) | 0700) != 0) {
		err = errno;
		close(csfd);
		close(cdfd);
		return fail(t, err, t->dst);
	}
	long changed = t->copied + t->removed;
	err = sync_dir(t, csfd, cdfd);
	/* the mtime last: making the entries changed it (a folder nothing was done in, whose
	 * lstat showed the source's metadata, is left as it is) */
	if (!err && (opened || !ds || t->copied + t->removed != changed || !meta_same(t, ss, ds)))
		err = fix_meta(t, cdfd, ss); /* (after a failure it stays open: removing the copy must still work) */
	close(csfd);
	close(cdfd);
	return err;
}

/* One entry of the source directory, brought over to the destination. */
static int sync_entry(tree_sync *t, int sfd, int dfd, const char *name)
{
	struct stat ss, ds;
	int have;
	if (fstatat(sfd, name, &ss, AT_SYMLINK_NOFOLLOW) != 0)
		return fail(t, errno, t->src);
	have = fstatat(dfd, name, &ds, AT_SYMLINK_NOFOLLOW) == 0;
	if (!have && errno != ENOENT)
		return fail(t, errno, t->dst);
	if (S_ISDIR(ss.st_mode))
		return sync_subdir(t, sfd, dfd, name, &ss, have ? &ds : NULL);
	if (S_ISLNK(ss.st_mode))
		return sync_link(t, sfd, dfd, name, &ss, have ? &ds : NULL);
	if (!S_ISREG(ss.st_mode))
		return fail(t, ENOTSUP, t->src);
	if (have && S_ISREG(ds.st_mode) && ds.st_size == ss.st_size) {
		int same = same_content(t, sfd, dfd, name);
		if (same < 0)
			return t->err;
		if (same) {
			int err = 0;
			if (!meta_same(t, &ss, &ds)) { /* opened only to fix what the lstat showed */
				int fd = openat(dfd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
				if (fd < 0)
					return fail(t, errno, t->dst);
				err = fix_meta(t, fd, &ss);
				close(fd);
			}
			if (!err)
				t->same++;
			return err;
		}
	}
	if (have && remove_entry(t, dfd, name, S_ISDIR(ds.st_mode)) != 0)
		return t->err;
	return copy_file(t, sfd, dfd, name, &ss);
}

/* Walks one directory of each tree: the source's entries first, then the destination's
 * that the source does not have. */
static int sync_dir(tree_sync *t, int sfd, int dfd)
{
	int pass, err = 0;
	long entries = 0; /* the source's, all of which the destination now has */
	for (pass = 0; pass < 2 && !err; pass++) {
		int walked = pass == 0 ? sfd : dfd;
		int fd = dup(walked);
		DIR *d;
		struct dirent *e;
		if (fd < 0)
			return fail(t, errno, pass == 0 ? t->src : t->dst);
		d = fdopendir(fd);
		if (!d) {
			err = errno;
			close(fd);
			return fail(t, err, pass == 0 ? t->src : t->dst);
		}
		if (pass == 1) {
			/* as many entries as the source's: the destination has nothing else */
			long n = 0;
			errno = 0;
			while ((e = readdir(d)) != NULL)
				if (!is_dot(e->d_name))
					n++;
			if (errno) {
				err = fail(t, errno, t->dst);
				closedir(d);
				break;
			}
			if (n == entries) { /* (the last pass: the walk is over) */
				closedir(d);
				break;
			}
			rewinddir(d);
		}
		for (;;) {
			size_t saved;
			struct stat st;
			errno = 0;
			e = readdir(d);
			if (!e) {
				if (errno)
					err = fail(t, errno, pass == 0 ? t->src : t->dst);
				break;
			}
			if (is_dot(e->d_name))
				continue;
			if (stop_requested(t)) {
				err = fail(t, ECANCELED, t->dst);
				break;
			}
			if ((err = push_name(t, e->d_name, &saved)) != 0) {
				fail(t, err, pass == 0 ? t->src : t->dst);
				break;
			}
			if (pass == 0) {
				err = sync_entry(t, sfd, dfd, e->d_name);
				entries++;
			} else if (fstatat(sfd, e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0) {
				if (errno != ENOENT)
					err = fail(t, errno, t->src);
				else if (fstatat(dfd, e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0)
					err = fail(t, errno, t->dst);
				else
					err = remove_entry(t, dfd, e->d_name, S_ISDIR(st.st_mode));
			}
			if (err)
				break;
			pop_name(t, saved);
		}
		closedir(d);
	}
	return err;
}

static void sync_work(uv_work_t *req)
{
	tree_sync *t = req->data;
	int sfd = -1, dfd = -1;
	struct stat ss;
	t->buf_a = malloc(SYNC_CHUNK);
	t->buf_b = malloc(SYNC_CHUNK);
	if (!t->buf_a || !t->buf_b) {
		fail(t, ENOMEM, t->dst);
		goto out;
	}
	sfd = open(t->src, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (sfd < 0 || fstat(sfd, &ss) != 0) {
		fail(t, errno, t->src);
		goto out;
	}
	if (mkdir(t->dst, 0700) != 0 && errno != EEXIST) {
		fail(t, errno, t->dst);
		goto out;
	}
	dfd = open(t->dst, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (dfd < 0) {
		fail(t, errno, t->dst);
		goto out;
	}
	if (sync_dir(t, sfd, dfd) == 0)
		fix_meta(t, dfd, &ss);
out:
	if (sfd >= 0)
		close(sfd);
	if (dfd >= 0)
		close(dfd);
	free(t->buf_a);
	free(t->buf_b);
	t->buf_a = t->buf_b = NULL;
	uv_mutex_lock(&t->mu);
	t->finished = 1;
	uv_cond_signal(&t->cv);
	uv_mutex_unlock(&t->mu);
}

/* ---- the loop side ---- */

static void sync_free(tree_sync *t)
{
	uv_cond_destroy(&t->cv);
	uv_mutex_destroy(&t->mu);
	free(t->src);
	free(t->dst);
	free(t);
}

/* The task went away (cancelled): the worker stops at its next entry, and this returns
 * once it has, so that nothing is written in the destination after the task is gone. */
static void sync_cancel(ops_wait *w)
{
	tree_sync *t = (tree_sync *)((char *)w - offsetof(tree_sync, w));
	__atomic_store_n(&t->cancelled, 1, __ATOMIC_RELAXED);
	if (uv_cancel((uv_req_t *)&t->req) == 0)
		return; /* never started: sync_done frees it */
	uv_mutex_lock(&t->mu);
	while (!t->finished)
		uv_cond_wait(&t->cv, &t->mu);
	uv_mutex_unlock(&t->mu);
}

static void sync_done(uv_work_t *req, int status)
{
	tree_sync *t = req->data;
	lua_State *co = ops_wait_thread(&t->w);
	if (co != NULL) {
		lua_checkstack(co, 4);
		if (status < 0) {
			lua_pushnil(co);
			lua_pushfstring(co, "%s: cannot sync %s", uv_err_name(status), t->dst);
			lua_pushstring(co, uv_err_name(status));
			ops_wait_complete(&t->w, 3);
		} else if (t->err) {
			char subject[2 * PATH_MAX];
			snprintf(subject, sizeof subject, "%s%s", t->side, t->rel);
			/* ENOTSUP is EOPNOTSUPP's number on Linux: named as documented */
			ops_wait_complete(&t->w, t->err == ENOTSUP
				? ops_fs_push_fail(co, "ENOTSUP", "not a file, directory or symlink (a fifo, socket or device)", subject)
				: ops_fs_push_errno(co, t->err, subject));
		} else {
			lua_createtable(co, 0, 3);
			lua_pushinteger(co, t->copied);
			lua_setfield(co, -2, "copied");
			lua_pushinteger(co, t->removed);
			lua_setfield(co, -2, "removed");
			lua_pushinteger(co, t->same);
			lua_setfield(co, -2, "same");
			ops_wait_complete(&t->w, 1);
		}
	}
	sync_free(t);
}

/* fs.sync_tree(src, dst) -> {copied, removed, same} | nil, err, code
 * Makes dst (created if missing) an exact copy of the directory src. Waits (in a task) while libuv's thread pool works. */
int ops_fs_sync_tree(lua_State *L)
{
	size_t ls, ld;
	const char *src = luaL_checklstring(L, 1, &ls);
	const char *dst = luaL_checklstring(L, 2, &ld);
	tree_sync *t;
	int rc;
	luaL_argcheck(L, strlen(src) == ls && ls > 0, 1, "a path without NUL bytes");
	luaL_argcheck(L, strlen(dst) == ld && ld > 0, 2, "a path without NUL bytes");
	ops_check_task(L, "fs.sync_tree");
	t = calloc(1, sizeof *t);
	if (t == NULL)
		return luaL_error(L, "out of memory");
	if (uv_mutex_init(&t->mu) != 0) {
		free(t);
		return luaL_error(L, "out of memory");
	}
	if (uv_cond_init(&t->cv) != 0) {
		uv_mutex_destroy(&t->mu);
		free(t);
		return luaL_error(L, "out of memory");
	}
	t->src = strdup(src);
	t->dst = strdup(dst);
	if (!t->src || !t->dst) {
		sync_free(t);
		return luaL_error(L, "out of memory");
	}
	t->as_root = geteuid() == 0;
	t->req.data = t;
	t->w.cancel = sync_cancel;
	rc = uv_queue_work(ops_loop(), &t->req, sync_work, sync_done);
	if (rc < 0) {
		sync_free(t);
		lua_pushnil(L);
		lua_pushfstring(L, "%s: cannot sync %s", uv_err_name(rc), dst);
		lua_pushstring(L, uv_err_name(rc));
		return 3;
	}
	return ops_wait_begin(L, &t->w, -1);
}
