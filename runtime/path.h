/* path.h: POSIX path logic behind ops.fs, free of Lua so cmocka can test it. */
#ifndef OPS_PATH_H
#define OPS_PATH_H

#include <stddef.h>

/* ops_path_within's result when the path resolves outside the root. */
#define OPS_PATH_EOUTSIDE (-1)

/*
 * Lexical normalisation, no file system access: collapses repeated slashes,
 * drops "." segments and trailing slashes, and cancels "x/.." pairs. A leading ".."
 * stays in a relative path and is dropped at the root ("/.." is "/"); "" becomes ".".
 * out needs len + 2 bytes and may be the same buffer as in. Returns the length of out,
 * which is NUL-terminated.
 */
size_t ops_path_normalize(const char *in, size_t len, char *out);

/*
 * Joins the n NUL-terminated parts with "/" and normalises the result. Empty parts
 * are skipped; a later absolute part does not reset the path ("/a" + "/b" is
 * "/a/b"). out needs sum(strlen(parts)) + n + 2 bytes; returns (size_t)-1 when
 * outsz is smaller than that, else the length of out.
 */
size_t ops_path_join(const char *const *parts, size_t n, char *out, size_t outsz);

/*
 * dirname(1) and basename(1), purely syntactic: trailing slashes are ignored,
 * "" gives ".", a path of only slashes gives "/". The result points into p or to a
 * static string; *outlen is its length (it is not NUL-terminated in general).
 */
const char *ops_path_dirname(const char *p, size_t len, size_t *outlen);
const char *ops_path_basename(const char *p, size_t len, size_t *outlen);

/* 1 when path is "root" or below it; both must be normalised absolute paths. */
int ops_path_contains(const char *root, const char *path);

/*
 * Resolves an absolute path like realpath(3), but the path need not exist: symlinks
 * are followed in every existing component, components that don't exist are kept
 * as written, "." and ".." are applied to the path resolved so far. Returns 0, or an
 * errno value (EINVAL for a relative path, ELOOP, ENAMETOOLONG, EACCES, ...).
 */
int ops_path_resolve(const char *path, char *out, size_t outsz);

/*
 * Confines path to the directory root. root must exist; a relative path is taken
 * relative to root. The path is resolved with ops_path_resolve, so both ".." and
 * symlinks that lead out are caught. Returns 0 with the resolved absolute path in
 * out, OPS_PATH_EOUTSIDE, or an errno value (a missing root is ENOENT). A check at
 * one moment: it cannot stop a symlink created afterwards.
 */
int ops_path_within(const char *root, const char *path, char *out, size_t outsz);

#endif
