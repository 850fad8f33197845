/*
 * Path logic for ops.fs: lexical normalisation, join, dirname/basename, and the
 * confinement check that resolves symlinks in the existing part of a path.
 */
#define _XOPEN_SOURCE 700

#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "path.h"

/* The kernel's own limit (MAXSYMLINKS) for symlinks followed in one lookup. */
#define MAX_SYMLINK_HOPS 40

size_t ops_path_normalize(const char *in, size_t len, char *out)
{
	/* Writes never overtake reads (w <= r), which makes out == in safe. */
	int rooted = len > 0 && in[0] == '/';
	size_t r = 0, w = 0, floor = 0;

	if (rooted) {
		out[w++] = '/';
		r = 1;
		floor = 1;
	}
	while (r < len) {
		if (in[r] == '/') {
			r++;
		} else if (in[r] == '.' && (r + 1 == len || in[r + 1] == '/')) {
			r++;
		} else if (in[r] == '.' && in[r + 1] == '.' &&
			   (r + 2 == len || in[r + 2] == '/')) {
			r += 2;
			if (w > floor) {
				w--;
				while (w > floor && out[w] != '/')
					w--;
			} else if (!rooted) {
				/* Nothing left to cancel: the ".." stays, and can't be cancelled. */
				if (w > 0)
					out[w++] = '/';
				out[w++] = '.';
				out[w++] = '.';
				floor = w;
			}
		} else {
			if ((rooted && w != 1) || (!rooted && w != 0))
				out[w++] = '/';
			while (r < len && in[r] != '/')
				out[w++] = in[r++];
		}
	}
	if (w == 0)
		out[w++] = '.';
	out[w] = '\0';
	return w;
}

size_t ops_path_join(const char *const *parts, size_t n, char *out, size_t outsz)
{
	size_t need = 2, w = 0;

	for (size_t i = 0; i < n; i++)
		need += strlen(parts[i]) + 1;
	if (outsz < need)
		return (size_t)-1;
	for (size_t i = 0; i < n; i++) {
		size_t plen = strlen(parts[i]);
		if (plen == 0)
			continue;
		if (w > 0)
			out[w++] = '/';
		memcpy(out + w, parts[i], plen);
		w += plen;
	}
	return ops_path_normalize(out, w, out);
}

static size_t strip_trailing_slashes(const char *p, size_t len)
{
	while (len > 1 && p[len - 1] == '/')
		len--;
	return len;
}

const char *ops_path_dirname(const char *p, size_t len, size_t *outlen)
{
	if (len == 0) {
		*outlen = 1;
		return ".";
	}
	len = strip_trailing_slashes(p, len);
	while (len > 0 && p[len - 1] != '/')
		len--;
	if (len == 0) {
		*outlen = 1;
		return ".";
	}
	len = strip_trailing_slashes(p, len);
	*outlen = len;
	return p;
}

const char *ops_path_basename(const char *p, size_t len, size_t *outlen)
{
	size_t start;

	if (len == 0) {
		*outlen = 1;
		return ".";
	}
	len = strip_trailing_slashes(p, len);
	if (len == 1 && p[0] == '/') {
		*outlen = 1;
		return p;
	}
	start = len;
	while (start > 0 && p[start - 1] != '/')
		start--;
	*outlen = len - start;
	return p + start;
}

int ops_path_contains(const char *root, const char *path)
{
	size_t rlen = strlen(root);

	if (rlen == 1 && root[0] == '/')
		return path[0] == '/';
	return strncmp(path, root, rlen) == 0 &&
	       (path[rlen] == '\0' || path[rlen] == '/');
}

int ops_path_resolve(const char *path, char *out, size_t outsz)
{
	char pending[PATH_MAX], target[PATH_MAX], next[PATH_MAX];
	const char *p = pending;
	size_t w = 1;
	int hops = 0;

	if (path[0] != '/')
		return EINVAL;
	if (outsz < 2 || strlen(path) >= sizeof pending)
		return ENAMETOOLONG;
	strcpy(pending, path);
	out[0] = '/';
	out[1] = '\0';

	while (*p) {
		const char *seg;
		size_t seglen, parent;
		struct stat st;
		ssize_t tlen;

		while (*p == '/')
			p++;
		if (!*p)
			break;
		seg = p;
		while (*p && *p != '/')
			p++;
		seglen = (size_t)(p - seg);
		if (seglen == 1 && seg[0] == '.')
			continue;
		if (seglen == 2 && seg[0] == '.' && seg[1] == '.') {
			/* out holds no symlinks, so its lexical parent is the real one. */
			while (w > 1 && out[w - 1] != '/')
				w--;
			if (w > 1)
				w--;
			out[w] = '\0';
			continue;
		}

		parent = w;
		if (w + 1 + seglen + 1 > outsz)
			return ENAMETOOLONG;
		if (w > 1)
			out[w++] = '/';
		memcpy(out + w, seg, seglen);
		w += seglen;
		out[w] = '\0';

		if (lstat(out, &st) != 0) {
			/* Not there (yet): the rest of the path is taken as written. */
			if (errno == ENOENT || errno == ENOTDIR)
				continue;
			return errno;
		}
		if (!S_ISLNK(st.st_mode))
			continue;

		if (++hops > MAX_SYMLINK_HOPS)
			return ELOOP;
		tlen = readlink(out, target, sizeof target);
		if (tlen < 0)
			return errno;
		if ((size_t)tlen >= sizeof target ||
		    (size_t)tlen + 1 + strlen(p) + 1 > sizeof next)
			return ENAMETOOLONG;
		memcpy(next, target, (size_t)tlen);
		next[tlen] = '/';
		strcpy(next + tlen + 1, p);
		strcpy(pending, next);
		p = pending;
		w = target[0] == '/' ? 1 : parent;
		out[w] = '\0';
	}
	return 0;
}

int ops_path_within(const char *root, const char *path, char *out, size_t outsz)
{
	char rroot[PATH_MAX], candidate[PATH_MAX];
	struct stat st;
	int rc;

	if (!realpath(root, rroot))
		return errno;
	if (stat(rroot, &st) != 0)
		return errno;
	if (!S_ISDIR(st.st_mode))
		return ENOTDIR;

	if (path[0] == '/') {
		if (strlen(path) >= sizeof candidate)
			return ENAMETOOLONG;
		strcpy(candidate, path);
	} else {
		size_t rlen = strlen(rroot), plen = strlen(path);
		if (rlen + 1 + plen >= sizeof candidate)
			return ENAMETOOLONG;
		memcpy(candidate, rroot, rlen);
		candidate[rlen] = '/';
		memcpy(candidate + rlen + 1, path, plen + 1);
	}

	rc = ops_path_resolve(candidate, out, outsz);
	if (rc != 0)
		return rc;
	return ops_path_contains(rroot, out) ? 0 : OPS_PATH_EOUTSIDE;
}
