/*
 * ops.core.fs: files, directories and paths with synchronous POSIX calls (local
 * file operations are fast enough not to need the libuv thread pool; a whole tree's
 * sync is the exception: treesync.c). Policy —
 * sorting, recursion over directories, temp directory objects — is in
 * lua/stdlib/ops/fs.lua; the path logic is in path.c.
 */
#define _GNU_SOURCE

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <lua.h>
#include <lauxlib.h>

#include "opsrun.h"
#include "path.h"
#include "treesync.h"

#define RES_MT "ops.core.fs.resource"
#define COPY_CHUNK (64 * 1024)
#define READ_CHUNK (64 * 1024)
/* Keeps ".<name>.tmp-xxxxxxxx" within NAME_MAX. */
#define TEMP_NAME_KEEP 200

/*
 * A descriptor, directory stream or glob result held while Lua values are built
 * from it: an allocation error raised meanwhile leaves it to __gc instead of
 * leaking it. Created empty, before the resource is acquired.
 */
typedef struct {
	int fd;
	DIR *dir;
	int globbed;
	glob_t g;
} fs_resource;

static void resource_release(fs_resource *r)
{
	if (r->fd >= 0)
		close(r->fd);
	if (r->dir)
		closedir(r->dir);
	if (r->globbed)
		globfree(&r->g);
	r->fd = -1;
	r->dir = NULL;
	r->globbed = 0;
}

static int resource_gc(lua_State *L)
{
	resource_release(luaL_checkudata(L, 1, RES_MT));
	return 0;
}

static int resource_tostring(lua_State *L)
{
	fs_resource *r = luaL_checkudata(L, 1, RES_MT);
	lua_pushfstring(L, "ops.core.fs.resource (%s)",
			r->fd >= 0 || r->dir || r->globbed ? "held" : "released");
	return 1;
}

static fs_resource *resource_new(lua_State *L)
{
	fs_resource *r = lua_newuserdatauv(L, sizeof *r, 0);
	r->fd = -1;
	r->dir = NULL;
	r->globbed = 0;
	luaL_setmetatable(L, RES_MT);
	return r;
}

/* ---- errors ---- */

int ops_fs_push_fail(lua_State *L, const char *code, const char *what, const char *subject)
{
	lua_pushnil(L);
	lua_pushfstring(L, "%s: %s: %s", code, what, subject);
	lua_pushstring(L, code);
	return 3;
}

/* nil, "ENOENT: no such file or directory: /x/y", "ENOENT" */
int ops_fs_push_errno(lua_State *L, int err, const char *subject)
{
	const char *code = strerrorname_np(err);
	const char *desc = strerrordesc_np(err);
	char what[128];

	snprintf(what, sizeof what, "%s", desc ? desc : "unknown error");
	what[0] = (char)tolower((unsigned char)what[0]);
	return ops_fs_push_fail(L, code ? code : "EUNKNOWN", what, subject);
}

/* ---- arguments ---- */

static const char *check_path_len(lua_State *L, int idx, size_t *len)
{
	const char *p;

	/* Unlike io.open, a number is not a path: it is almost always a mistake. */
	luaL_argexpected(L, lua_type(L, idx) == LUA_TSTRING, idx, "string");
	p = lua_tolstring(L, idx, len);
	luaL_argcheck(L, strlen(p) == *len, idx, "path contains a NUL byte");
	return p;
}

static const char *check_path(lua_State *L, int idx)
{
	size_t len;
	return check_path_len(L, idx, &len);
}

const char *ops_checkpath(lua_State *L, int arg)
{
	return check_path(L, arg);
}

const char *ops_path_field(lua_State *L, int idx, const char *what)
{
	size_t len;
	const char *p;

	if (lua_type(L, idx) != LUA_TSTRING)
		luaL_error(L, "%s must be a path (a string), not %s", what, luaL_typename(L, idx));
	p = lua_tolstring(L, idx, &len);
	if (strlen(p) != len)
		luaL_error(L, "%s contains a NUL byte", what);
	return p;
}

/* A mode is an integer (493) or a string of octal digits ("0755", "755"). */
static int check_mode(lua_State *L, int idx)
{
	long m;

	if (lua_type(L, idx) == LUA_TSTRING) {
		const char *s = lua_tostring(L, idx);
		luaL_argcheck(L, *s && strspn(s, "01234567") == strlen(s), idx,
			      "mode must be an integer or an octal string like \"0755\"");
		m = strtol(s, NULL, 8);
	} else {
		m = (long)luaL_checkinteger(L, idx);
	}
	luaL_argcheck(L, m >= 0 && m <= 07777, idx, "mode out of range (0 to 0o7777)");
	return (int)m;
}

static int opt_mode(lua_State *L, int idx)
{
	return lua_isnoneornil(L, idx) ? -1 : check_mode(L, idx);
}

/* ---- helpers ---- */

static int write_all(int fd, const char *data, size_t len)
{
	while (len > 0) {
		ssize_t n = write(fd, data, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return errno;
		}
		data += n;
		len -= (size_t)n;
	}
	return 0;
}

static const char *type_name(mode_t mode)
{
	if (S_ISREG(mode))
		return "file";
	if (S_ISDIR(mode))
		return "directory";
	if (S_ISLNK(mode))
		return "link";
	return "other";
}

/* ---- files ---- */

/* fs.read(path) -> string | nil, err, code */
static int fs_read(lua_State *L)
{
	const char *path = check_path(L, 1);
	fs_resource *r = resource_new(L);
	struct stat st;
	luaL_Buffer b;
	size_t chunk;
	int err;

	r->fd = open(path, O_RDONLY | O_CLOEXEC);
	if (r->fd < 0)
		return ops_fs_push_errno(L, errno, path);
	if (fstat(r->fd, &st) != 0) {
		err = errno;
		goto fail;
	}
	if (S_ISDIR(st.st_mode)) {
		err = EISDIR;
		goto fail;
	}
	/* One read for a regular file; the +1 sees EOF without a second buffer grow. */
	chunk = S_ISREG(st.st_mode) && st.st_size > 0 ? (size_t)st.st_size + 1 : READ_CHUNK;
	luaL_buffinit(L, &b);
	for (;;) {
		char *p = luaL_prepbuffsize(&b, chunk);
		ssize_t n = read(r->fd, p, chunk);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			err = errno;
			goto fail;
		}
		if (n == 0)
			break;
		luaL_addsize(&b, (size_t)n);
		chunk = READ_CHUNK;
	}
	resource_release(r);
	luaL_pushresult(&b);
	return 1;
fail:
	resource_release(r);
	return ops_fs_push_errno(L, err, path);
}

static int write_file(lua_State *L, int flags)
{
	const char *path = check_path(L, 1);
	size_t len;
	const char *data = luaL_checklstring(L, 2, &len);
	int mode = opt_mode(L, 3);
	int err = 0;
	int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC | flags,
		      mode >= 0 ? (mode_t)mode : 0666);

	if (fd < 0)
		return ops_fs_push_errno(L, errno, path);
	/* An explicit mode is exact (no umask), and set before any data is in the file. */
	if (mode >= 0 && fchmod(fd, (mode_t)mode) != 0)
		err = errno;
	if (!err)
		err = write_all(fd, data, len);
	if (close(fd) != 0 && !err)
		err = errno;
	if (err)
		return ops_fs_push_errno(L, err, path);
	lua_pushboolean(L, 1);
	return 1;
}

/* fs.write(path, data [, mode]) -> true | nil, err, code */
static int fs_write(lua_State *L)
{
	return write_file(L, O_TRUNC);
}

/* fs.append(path, data [, mode]) -> true | nil, err, code */
static int fs_append(lua_State *L)
{
	return write_file(L, O_APPEND);
}

static unsigned temp_suffix(void)
{
	static unsigned counter;
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return ((unsigned)getpid() * 2654435761u) ^ (unsigned)ts.tv_nsec ^ (++counter * 40503u);
}

/* fs.write_atomic(path, data [, mode]) -> true | nil, err, code */
static int fs_write_atomic(lua_State *L)
{
	size_t plen, len, dlen, blen;
	const char *path = check_path_len(L, 1, &plen);
	const char *data = luaL_checklstring(L, 2, &len);
	int mode = opt_mode(L, 3);
	const char *dir = ops_path_dirname(path, plen, &dlen);
	const char *base = ops_path_basename(path, plen, &blen);
	char dirbuf[PATH_MAX], tmp[PATH_MAX];
	struct stat old;
	int have_old, fd = -1, dfd, err = 0;

	if (dlen >= sizeof dirbuf)
		return ops_fs_push_errno(L, ENAMETOOLONG, path);
	memcpy(dirbuf, dir, dlen);
	dirbuf[dlen] = '\0';
	if (blen > TEMP_NAME_KEEP)
		blen = TEMP_NAME_KEEP;

	/* O_EXCL, not mkstemp: the temp file gets 0666 & ~umask like a plain write. */
	for (int attempt = 0; attempt < 100 && fd < 0; attempt++) {
		int n = snprintf(tmp, sizeof tmp, "%s/.%.*s.tmp-%08x", dirbuf, (int)blen,
				 base, temp_suffix());
		if (n < 0 || (size_t)n >= sizeof tmp)
			return ops_fs_push_errno(L, ENAMETOOLONG, path);
		fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
		if (fd < 0 && errno != EEXIST)
			return ops_fs_push_errno(L, errno, path);
	}
	if (fd < 0)
		return ops_fs_push_errno(L, EEXIST, tmp);

	/* Replacing a file keeps its owner and mode unless a mode is given. */
	have_old = lstat(path, &old) == 0 && S_ISREG(old.st_mode);
	if (mode < 0 && have_old) {
		if (fchown(fd, old.st_uid, old.st_gid) != 0) {
			/* Not permitted unless root: the new file stays ours. */
		}
		mode = (int)(old.st_mode & 07777);
	}
	if (mode >= 0 && fchmod(fd, (mode_t)mode) != 0)
		err = errno;
	if (!err)
		err = write_all(fd, data, len);
	if (!err && fsync(fd) != 0)
		err = errno;
	if (close(fd) != 0 && !err)
		err = errno;
	if (!err && rename(tmp, path) != 0)
		err = errno;
	if (err) {
		unlink(tmp);
		return ops_fs_push_errno(L, err, path);
	}

	/* The rename is durable only once the directory is synced. */
	dfd = open(dirbuf, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dfd < 0)
		return ops_fs_push_errno(L, errno, dirbuf);
	if (fsync(dfd) != 0 && errno != EINVAL)
		err = errno;
	close(dfd);
	if (err)
		return ops_fs_push_errno(L, err, dirbuf);
	lua_pushboolean(L, 1);
	return 1;
}

/* fs.copy(src, dst) -> true | nil, err, code */
static int fs_copy(lua_State *L)
{
	const char *src = check_path(L, 1);
	const char *dst = check_path(L, 2);
	char buf[COPY_CHUNK];
	struct stat st, dst_st;
	int in, out, err = 0;
	const char *culprit = src;

	in = open(src, O_RDONLY | O_CLOEXEC);
	if (in < 0)
		return ops_fs_push_errno(L, errno, src);
	if (fstat(in, &st) != 0) {
		err = errno;
		close(in);
		return ops_fs_push_errno(L, err, src);
	}
	if (!S_ISREG(st.st_mode)) {
		close(in);
		if (S_ISDIR(st.st_mode))
			return ops_fs_push_errno(L, EISDIR, src);
		return ops_fs_push_fail(L, "EINVAL", "not a regular file", src);
	}
	/* Opening dst with O_TRUNC would empty src first. */
	if (stat(dst, &dst_st) == 0 && dst_st.st_dev == st.st_dev && dst_st.st_ino == st.st_ino) {
		close(in);
		return ops_fs_push_fail(L, "EINVAL", "source and destination are the same file", dst);
	}
	out = open(dst, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, st.st_mode & 0777);
	if (out < 0) {
		err = errno;
		close(in);
		return ops_fs_push_errno(L, err, dst);
	}
	if (fchmod(out, st.st_mode & 07777) != 0) {
		err = errno;
		culprit = dst;
	}
	while (!err) {
		ssize_t n = read(in, buf, sizeof buf);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			err = errno;
			break;
		}
		if (n == 0)
			break;
		err = write_all(out, buf, (size_t)n);
		if (err)
			culprit = dst;
	}
	close(in);
	if (close(out) != 0 && !err) {
		err = errno;
		culprit = dst;
	}
	if (err) {
		unlink(dst);
		return ops_fs_push_errno(L, err, culprit);
	}
	lua_pushboolean(L, 1);
	return 1;
}

/* ---- metadata ---- */

/* stat or lstat (follow, at index 2, defaults to true) of the path at index 1 into *st;
 * 0, or what ops_fs_push_errno pushed (nil, err, code) */
static int stat_arg(lua_State *L, struct stat *st)
{
	const char *path = check_path(L, 1);
	int follow = lua_isnoneornil(L, 2) || lua_toboolean(L, 2);

	if ((follow ? stat(path, st) : lstat(path, st)) != 0)
		return ops_fs_push_errno(L, errno, path);
	return 0;
}

/* fs.stat(path [, follow=true]) -> {type, size, mode, mtime, uid, gid, ino} | nil, err, code */
static int fs_stat(lua_State *L)
{
	struct stat st;
	int failed = stat_arg(L, &st);

	if (failed)
		return failed;
	lua_createtable(L, 0, 7);
	lua_pushstring(L, type_name(st.st_mode));
	lua_setfield(L, -2, "type");
	lua_pushinteger(L, (lua_Integer)st.st_size);
	lua_setfield(L, -2, "size");
	lua_pushinteger(L, (lua_Integer)(st.st_mode & 07777));
	lua_setfield(L, -2, "mode");
	lua_pushnumber(L, (lua_Number)st.st_mtim.tv_sec + (lua_Number)st.st_mtim.tv_nsec / 1e9);
	lua_setfield(L, -2, "mtime");
	lua_pushinteger(L, (lua_Integer)st.st_uid);
	lua_setfield(L, -2, "uid");
	lua_pushinteger(L, (lua_Integer)st.st_gid);
	lua_setfield(L, -2, "gid");
	lua_pushinteger(L, (lua_Integer)st.st_ino);
	lua_setfield(L, -2, "ino");
	return 1;
}

/* fs.type(path [, follow]) -> "file" | "directory" | ... (fs.stat's type) | nil, err, code:
 * what fs.stat(path).type says, without the table */
static int fs_type(lua_State *L)
{
	struct stat st;
	int failed = stat_arg(L, &st);

	if (failed)
		return failed;
	lua_pushstring(L, type_name(st.st_mode));
	return 1;
}

/* fs.exists(path) -> boolean | nil, err, code */
static int fs_exists(lua_State *L)
{
	const char *path = check_path(L, 1);
	struct stat st;

	if (stat(path, &st) == 0) {
		lua_pushboolean(L, 1);
		return 1;
	}
	if (errno == ENOENT || errno == ENOTDIR) {
		lua_pushboolean(L, 0);
		return 1;
	}
	return ops_fs_push_errno(L, errno, path);
}

/* fs.is_executable(path) -> boolean | nil, err, code */
static int fs_is_executable(lua_State *L)
{
	const char *path = check_path(L, 1);
	struct stat st;

	if (stat(path, &st) != 0) {
		if (errno == ENOENT || errno == ENOTDIR) {
			lua_pushboolean(L, 0);
			return 1;
		}
		return ops_fs_push_errno(L, errno, path);
	}
	/* For root, access(X_OK) is true when any x bit is set, as execve agrees. */
	lua_pushboolean(L, S_ISREG(st.st_mode) && access(path, X_OK) == 0);
	return 1;
}

/* fs.chmod(path, mode) -> true | nil, err, code */
static int fs_chmod(lua_State *L)
{
	const char *path = check_path(L, 1);
	int mode = check_mode(L, 2);

	if (chmod(path, (mode_t)mode) != 0)
		return ops_fs_push_errno(L, errno, path);
	lua_pushboolean(L, 1);
	return 1;
}

/* fs.realpath(path) -> absolute path | nil, err, code */
static int fs_realpath(lua_State *L)
{
	const char *path = check_path(L, 1);
	char out[PATH_MAX];

	if (!realpath(path, out))
		return ops_fs_push_errno(L, errno, path);
	lua_pushstring(L, out);
	return 1;
}

/* fs.readlink(path) -> target | nil, err, code */
static int fs_readlink(lua_State *L)
{
	const char *path = check_path(L, 1);
	char out[PATH_MAX];
	ssize_t n = readlink(path, out, sizeof out);

	if (n < 0)
		return ops_fs_push_errno(L, errno, path);
	if ((size_t)n >= sizeof out)
		return ops_fs_push_errno(L, ENAMETOOLONG, path);
	lua_pushlstring(L, out, (size_t)n);
	return 1;
}

/* fs.symlink(target, linkpath) -> true | nil, err, code */
static int fs_symlink(lua_State *L)
{
	const char *target = check_path(L, 1);
	const char *linkpath = check_path(L, 2);

	if (symlink(target, linkpath) != 0)
		return ops_fs_push_errno(L, errno, linkpath);
	lua_pushboolean(L, 1);
	return 1;
}

/* fs.rename(src, dst) -> true | nil, err, code */
static int fs_rename(lua_State *L)
{
	const char *src = check_path(L, 1);
	const char *dst = check_path(L, 2);

	if (rename(src, dst) != 0) {
		lua_pushfstring(L, "%s -> %s", src, dst);
		return ops_fs_push_errno(L, errno, lua_tostring(L, -1));
	}
	lua_pushboolean(L, 1);
	return 1;
}

/* ---- directories ---- */

/* fs.scandir(dir) -> names (unsorted), types (name -> type) | nil, err, code */
static int fs_scandir(lua_State *L)
{
	const char *path = check_path(L, 1);
	fs_resource *r = resource_new(L);
	struct dirent *e;
	lua_Integer n = 0;

	r->dir = opendir(path);
	if (!r->dir)
		return ops_fs_push_errno(L, errno, path);
	lua_newtable(L);
	lua_newtable(L);
	for (;;) {
		const char *type;
		errno = 0;
		e = readdir(r->dir);
		if (!e)
			break;
		if (e->d_name[0] == '.' &&
		    (e->d_name[1] == '\0' || (e->d_name[1] == '.' && e->d_name[2] == '\0')))
			continue;
		switch (e->d_type) {
		case DT_REG:
			type = "file";
			break;
		case DT_DIR:
			type = "directory";
			break;
		case DT_LNK:
			type = "link";
			break;
		case DT_UNKNOWN: {
			struct stat st;
			if (fstatat(dirfd(r->dir), e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0) {
				int err = errno;
				if (err == ENOENT)
					continue; /* removed since readdir */
				resource_release(r);
				return ops_fs_push_errno(L, err, path);
			}
			type = type_name(st.st_mode);
			break;
		}
		default:
			type = "other";
		}
		lua_pushstring(L, e->d_name);
		lua_pushvalue(L, -1);
		lua_rawseti(L, -4, ++n);
		lua_pushstring(L, type);
		lua_rawset(L, -3);
	}
	if (errno != 0) {
		int err = errno;
		resource_release(r);
		return ops_fs_push_errno(L, err, path);
	}
	resource_release(r);
	return 2;
}

/* fs.mkdir(path [, mode]) -> true | nil, err, code; one level, an explicit mode is exact */
static int fs_mkdir(lua_State *L)
{
	const char *path = check_path(L, 1);
	int mode = opt_mode(L, 2);

	if (mkdir(path, mode >= 0 ? (mode_t)mode : 0777) != 0)
		return ops_fs_push_errno(L, errno, path);
	if (mode >= 0 && chmod(path, (mode_t)mode) != 0)
		return ops_fs_push_errno(L, errno, path);
	lua_pushboolean(L, 1);
	return 1;
}

/* fs.remove(path) -> true | nil, err, code; a file, a symlink or an empty directory */
static int fs_remove(lua_State *L)
{
	const char *path = check_path(L, 1);
	struct stat st;

	if (lstat(path, &st) != 0)
		return ops_fs_push_errno(L, errno, path);
	if ((S_ISDIR(st.st_mode) ? rmdir(path) : unlink(path)) != 0)
		return ops_fs_push_errno(L, errno, path);
	lua_pushboolean(L, 1);
	return 1;
}

/*
 * Empties the directory open as dfd (taking ownership of dfd) without following
 * symlinks: each directory is opened relative to its parent with O_NOFOLLOW, so an
 * entry swapped for a symlink meanwhile fails instead of being followed. path names
 * the directory (len bytes) and on failure names the entry that failed.
 */
int ops_fs_remove_contents(int dfd, char *path, size_t len, size_t cap)
{
	DIR *d = fdopendir(dfd);
	struct dirent *e;
	int err = 0;

	if (!d) {
		err = errno;
		close(dfd);
		return err;
	}
	for (;;) {
		size_t nlen;
		int isdir;

		errno = 0;
		e = readdir(d);
		if (!e) {
			err = errno;
			break;
		}
		if (e->d_name[0] == '.' &&
		    (e->d_name[1] == '\0' || (e->d_name[1] == '.' && e->d_name[2] == '\0')))
			continue;
		nlen = strlen(e->d_name);
		if (len + 1 + nlen >= cap) {
			err = ENAMETOOLONG;
			break;
		}
		path[len] = '/';
		memcpy(path + len + 1, e->d_name, nlen + 1);

		isdir = e->d_type == DT_DIR;
		if (e->d_type == DT_UNKNOWN) {
			struct stat st;
			if (fstatat(dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0) {
				err = errno;
				break;
			}
			isdir = S_ISDIR(st.st_mode);
		}
		if (isdir) {
			int cfd = openat(dirfd(d), e->d_name,
					 O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
			if (cfd < 0) {
				err = errno;
				break;
			}
			err = ops_fs_remove_contents(cfd, path, len + 1 + nlen, cap);
			if (err)
				break;
			if (unlinkat(dirfd(d), e->d_name, AT_REMOVEDIR) != 0) {
				err = errno;
				break;
			}
		} else if (unlinkat(dirfd(d), e->d_name, 0) != 0) {
			err = errno;
			break;
		}
		path[len] = '\0';
	}
	closedir(d);
	return err;
}

/* fs.remove_tree(path) -> true | nil, err, code; symlinks are removed, never followed */
static int fs_remove_tree(lua_State *L)
{
	size_t len;
	const char *path = check_path_len(L, 1, &len);
	char buf[PATH_MAX];
	struct stat st;
	int fd, err;

	if (lstat(path, &st) != 0)
		return ops_fs_push_errno(L, errno, path);
	if (!S_ISDIR(st.st_mode)) {
		if (unlink(path) != 0)
			return ops_fs_push_errno(L, errno, path);
		lua_pushboolean(L, 1);
		return 1;
	}
	if (len >= sizeof buf)
		return ops_fs_push_errno(L, ENAMETOOLONG, path);
	memcpy(buf, path, len + 1);
	fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0)
		return ops_fs_push_errno(L, errno, path);
	err = ops_fs_remove_contents(fd, buf, len, sizeof buf);
	if (err)
		return ops_fs_push_errno(L, err, buf);
	if (rmdir(path) != 0)
		return ops_fs_push_errno(L, errno, path);
	lua_pushboolean(L, 1);
	return 1;
}

static int make_temp(lua_State *L, int dir)
{
	size_t len;
	const char *template = check_path_len(L, 1, &len);
	char buf[PATH_MAX];

	luaL_argcheck(L, len >= 6 && strcmp(template + len - 6, "XXXXXX") == 0, 1,
		      "template must end in XXXXXX");
	if (len >= sizeof buf)
		return ops_fs_push_errno(L, ENAMETOOLONG, template);
	memcpy(buf, template, len + 1);
	if (dir) {
		if (!mkdtemp(buf))
			return ops_fs_push_errno(L, errno, template);
	} else {
		int fd = mkostemp(buf, O_CLOEXEC);
		if (fd < 0)
			return ops_fs_push_errno(L, errno, template);
		close(fd);
	}
	lua_pushstring(L, buf);
	return 1;
}

/* fs.mkdtemp(template) -> path | nil, err, code; a new 0700 directory */
static int fs_mkdtemp(lua_State *L)
{
	return make_temp(L, 1);
}

/* fs.mkstemp(template) -> path | nil, err, code; a new empty 0600 file */
static int fs_mkstemp(lua_State *L)
{
	return make_temp(L, 0);
}

/* fs.glob(pattern) -> array of paths (unsorted) | nil, err, code */
static int fs_glob(lua_State *L)
{
	const char *pattern = check_path(L, 1);
	fs_resource *r = resource_new(L);
	int rc = glob(pattern, GLOB_NOSORT | GLOB_BRACE, NULL, &r->g);

	r->globbed = 1;
	if (rc == GLOB_NOSPACE) {
		resource_release(r);
		return ops_fs_push_errno(L, ENOMEM, pattern);
	}
	if (rc != 0 && rc != GLOB_NOMATCH) {
		resource_release(r);
		return ops_fs_push_fail(L, "EIO", "read error while matching", pattern);
	}
	lua_createtable(L, rc == 0 ? (int)r->g.gl_pathc : 0, 0);
	for (size_t i = 0; rc == 0 && i < r->g.gl_pathc; i++) {
		lua_pushstring(L, r->g.gl_pathv[i]);
		lua_rawseti(L, -2, (lua_Integer)i + 1);
	}
	resource_release(r);
	return 1;
}

/* ---- paths ---- */

/* fs.normalize(path) -> path; lexical, no file system access */
static int fs_normalize(lua_State *L)
{
	size_t len;
	const char *p = check_path_len(L, 1, &len);
	luaL_Buffer b;
	char *out = luaL_buffinitsize(L, &b, len + 2);

	luaL_pushresultsize(&b, ops_path_normalize(p, len, out));
	return 1;
}

/* fs.join(part, ...) -> normalised path */
static int fs_join(lua_State *L)
{
	int n = lua_gettop(L);
	size_t total = 2;
	const char **parts;
	luaL_Buffer b;
	char *out;

	luaL_argcheck(L, n > 0, 1, "at least one path expected");
	for (int i = 1; i <= n; i++) {
		size_t len;
		check_path_len(L, i, &len);
		total += len + 1;
	}
	const char *small[16]; /* the usual few parts: no userdata for the collector */
	parts = n <= 16 ? small : lua_newuserdatauv(L, (size_t)n * sizeof *parts, 0);
	for (int i = 1; i <= n; i++)
		parts[i - 1] = lua_tostring(L, i);
	out = luaL_buffinitsize(L, &b, total);
	luaL_pushresultsize(&b, ops_path_join(parts, (size_t)n, out, total));
	return 1;
}

/* fs.dirname(path) -> path; dirname(1) */
static int fs_dirname(lua_State *L)
{
	size_t len, outlen;
	const char *p = check_path_len(L, 1, &len);
	const char *d = ops_path_dirname(p, len, &outlen);

	lua_pushlstring(L, d, outlen);
	return 1;
}

/* fs.basename(path) -> name; basename(1) */
static int fs_basename(lua_State *L)
{
	size_t len, outlen;
	const char *p = check_path_len(L, 1, &len);
	const char *base = ops_path_basename(p, len, &outlen);

	lua_pushlstring(L, base, outlen);
	return 1;
}

/* fs.is_absolute(path) -> boolean */
static int fs_is_absolute(lua_State *L)
{
	lua_pushboolean(L, check_path(L, 1)[0] == '/');
	return 1;
}

/* fs.within(root, path) -> resolved absolute path | nil, err, code */
static int fs_within(lua_State *L)
{
	const char *root = check_path(L, 1);
	const char *path = check_path(L, 2);
	char out[PATH_MAX];
	int rc = ops_path_within(root, path, out, sizeof out);

	if (rc == 0) {
		lua_pushstring(L, out);
		return 1;
	}
	lua_pushfstring(L, "%s (root %s)", path, root);
	if (rc == OPS_PATH_EOUTSIDE)
		return ops_fs_push_fail(L, "EOUTSIDE", "path leads outside its root", lua_tostring(L, -1));
	return ops_fs_push_errno(L, rc, lua_tostring(L, -1));
}

static const luaL_Reg fs_funcs[] = {
	{"read", fs_read},
	{"write", fs_write},
	{"append", fs_append},
	{"write_atomic", fs_write_atomic},
	{"copy", fs_copy},
	{"stat", fs_stat},
	{"exists", fs_exists},
	{"is_executable", fs_is_executable},
	{"chmod", fs_chmod},
	{"realpath", fs_realpath},
	{"readlink", fs_readlink},
	{"symlink", fs_symlink},
	{"rename", fs_rename},
	{"scandir", fs_scandir},
	{"mkdir", fs_mkdir},
	{"remove", fs_remove},
	{"remove_tree", fs_remove_tree},
	{"sync_tree", ops_fs_sync_tree},
	{"mkdtemp", fs_mkdtemp},
	{"mkstemp", fs_mkstemp},
	{"glob", fs_glob},
	{"normalize", fs_normalize},
	{"join", fs_join},
	{"type", fs_type},
	{"dirname", fs_dirname},
	{"basename", fs_basename},
	{"is_absolute", fs_is_absolute},
	{"within", fs_within},
	{NULL, NULL},
};

static const luaL_Reg resource_meta[] = {
	{"__gc", resource_gc},
	{"__close", resource_gc},
	{"__tostring", resource_tostring},
	{NULL, NULL},
};

int luaopen_ops_core_fs(lua_State *L)
{
	if (luaL_newmetatable(L, RES_MT))
		luaL_setfuncs(L, resource_meta, 0);
	lua_pop(L, 1);
	luaL_newlib(L, fs_funcs);
	return 1;
}
