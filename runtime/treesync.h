/* Tree sync (treesync.c) and what it shares with fs.c: tree removal, failure results. */
#ifndef OPSRUN_TREESYNC_H
#define OPSRUN_TREESYNC_H

#include <stddef.h>

#include <lua.h>

/* Empties the directory open as dfd (taking ownership of dfd) without following symlinks.
 * path names the directory (len bytes, cap bytes of room) and on failure names the entry
 * that failed. Returns 0 or an errno value. */
int ops_fs_remove_contents(int dfd, char *path, size_t len, size_t cap);

/* Push nil, "CODE: what: subject", "CODE" and return 3: ops_fs_push_errno names err by its
 * errno name and (lowercased) description. */
int ops_fs_push_fail(lua_State *L, const char *code, const char *what, const char *subject);
int ops_fs_push_errno(lua_State *L, int err, const char *subject);

/* fs.sync_tree(src, dst [, {prune_only = true}]) (a Lua C function; waits, in a task) */
int ops_fs_sync_tree(lua_State *L);

#endif
