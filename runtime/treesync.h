/* Tree sync (treesync.c) and the tree removal it shares with fs.c. */
#ifndef OPSRUN_TREESYNC_H
#define OPSRUN_TREESYNC_H

#include <stddef.h>

#include <lua.h>

/* Empties the directory open as dfd (taking ownership of dfd) without following symlinks.
 * path names the directory (len bytes, cap bytes of room) and on failure names the entry
 * that failed. Returns 0 or an errno value. */
int ops_fs_remove_contents(int dfd, char *path, size_t len, size_t cap);

/* fs.sync_tree(src, dst [, {prune_only = true}]) (a Lua C function; waits, in a task) */
int ops_fs_sync_tree(lua_State *L);

#endif
