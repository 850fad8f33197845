/*
 * ops.core.store: SQLite connections for the durable store.
 *
 * A db handle owns one sqlite3 connection and a small cache of prepared
 * statements keyed by SQL text. A rows() cursor borrows a statement; the cursor
 * and the db both check whether the connection is still open before touching it,
 * so close(), __close and __gc may run in any order.
 */
#define _POSIX_C_SOURCE 200809L /* strdup, clock_gettime under -std=c11 */

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <lua.h>
#include <lauxlib.h>

#include <sqlite3.h>

#include "opsrun.h"

#define DB_MT "ops.store.db"
#define CURSOR_MT "ops.store.cursor"
#define STMT_CACHE_SIZE 64
#define DEFAULT_BUSY_TIMEOUT_MS 5000

typedef struct {
	char *sql; /* NULL when the slot is free */
	size_t len;
	sqlite3_stmt *stmt;
	int in_use; /* lent to a cursor: not reusable, not evictable */
	unsigned long last_used;
} cache_slot;

typedef struct {
	sqlite3 *db; /* NULL once closed */
	char *path;
	int wal_frames; /* frames in the WAL after the last commit (autocheckpoint = false only) */
	unsigned long tick;
	cache_slot cache[STMT_CACHE_SIZE];
} store_db;

typedef struct {
	store_db *owner;    /* kept alive through the cursor's user value */
	sqlite3_stmt *stmt; /* NULL once finished */
	int slot;           /* cache slot lent to this cursor, or -1 */
	int ncols;
} store_cursor;

static const char *primary_code_name(int rc)
{
	switch (rc & 0xff) {
	case SQLITE_OK: return "SQLITE_OK";
	case SQLITE_ERROR: return "SQLITE_ERROR";
	case SQLITE_INTERNAL: return "SQLITE_INTERNAL";
	case SQLITE_PERM: return "SQLITE_PERM";
	case SQLITE_ABORT: return "SQLITE_ABORT";
	case SQLITE_BUSY: return "SQLITE_BUSY";
	case SQLITE_LOCKED: return "SQLITE_LOCKED";
	case SQLITE_NOMEM: return "SQLITE_NOMEM";
	case SQLITE_READONLY: return "SQLITE_READONLY";
	case SQLITE_INTERRUPT: return "SQLITE_INTERRUPT";
	case SQLITE_IOERR: return "SQLITE_IOERR";
	case SQLITE_CORRUPT: return "SQLITE_CORRUPT";
	case SQLITE_NOTFOUND: return "SQLITE_NOTFOUND";
	case SQLITE_FULL: return "SQLITE_FULL";
	case SQLITE_CANTOPEN: return "SQLITE_CANTOPEN";
	case SQLITE_PROTOCOL: return "SQLITE_PROTOCOL";
	case SQLITE_EMPTY: return "SQLITE_EMPTY";
	case SQLITE_SCHEMA: return "SQLITE_SCHEMA";
	case SQLITE_TOOBIG: return "SQLITE_TOOBIG";
	case SQLITE_CONSTRAINT: return "SQLITE_CONSTRAINT";
	case SQLITE_MISMATCH: return "SQLITE_MISMATCH";
	case SQLITE_MISUSE: return "SQLITE_MISUSE";
	case SQLITE_NOLFS: return "SQLITE_NOLFS";
	case SQLITE_AUTH: return "SQLITE_AUTH";
	case SQLITE_FORMAT: return "SQLITE_FORMAT";
	case SQLITE_RANGE: return "SQLITE_RANGE";
	case SQLITE_NOTADB: return "SQLITE_NOTADB";
	case SQLITE_NOTICE: return "SQLITE_NOTICE";
	case SQLITE_WARNING: return "SQLITE_WARNING";
	default: return "SQLITE_ERROR";
	}
}

/* Pushes nil, "CODE: message", "CODE" using the connection's last error. */
static int push_sqlite_error(lua_State *L, sqlite3 *db, int rc)
{
	const char *code = primary_code_name(rc);
	const char *msg = db ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
	lua_pushnil(L);
	lua_pushfstring(L, "%s: %s", code, msg);
	lua_pushstring(L, code);
	return 3;
}

static store_db *check_db(lua_State *L, int idx)
{
	return (store_db *)luaL_checkudata(L, idx, DB_MT);
}

static store_db *check_open_db(lua_State *L, int idx)
{
	store_db *d = check_db(L, idx);
	if (d->db == NULL)
		luaL_error(L, "ops.store: database is closed");
	return d;
}

/* ---- statement cache ---------------------------------------------------- */

static void slot_clear(cache_slot *s)
{
	sqlite3_finalize(s->stmt);
	free(s->sql);
	s->sql = NULL;
	s->stmt = NULL;
	s->in_use = 0;
	s->len = 0;
}

/*
 * Every statement this connection prepared must be finalized before
 * sqlite3_close; cursors notice the connection is gone and don't finalize twice.
 */
static int db_release(store_db *d)
{
	int rc;
	sqlite3_stmt *st;

	if (d->db == NULL)
		return SQLITE_OK;
	for (int i = 0; i < STMT_CACHE_SIZE; i++)
		if (d->cache[i].sql != NULL)
			slot_clear(&d->cache[i]);
	while ((st = sqlite3_next_stmt(d->db, NULL)) != NULL)
		sqlite3_finalize(st);
	rc = sqlite3_close_v2(d->db);
	d->db = NULL;
	free(d->path);
	d->path = NULL;
	return rc;
}

/*
 * Returns a reset statement for sql and sets *slot to its cache slot (or -1 if
 * the statement is private to the caller, who must finalize it). On an SQLite
 * error returns NULL and *rc holds the code; raises if sql holds more than one
 * statement.
 */
static sqlite3_stmt *acquire_stmt(lua_State *L, store_db *d, const char *sql, size_t len,
				  int *slot, int *rc)
{
	sqlite3_stmt *stmt = NULL, *extra = NULL;
	const char *tail = NULL;
	int free_slot = -1, victim = -1;

	d->tick++;
	for (int i = 0; i < STMT_CACHE_SIZE; i++) {
		cache_slot *s = &d->cache[i];
		if (s->sql == NULL) {
			if (free_slot < 0)
				free_slot = i;
			continue;
		}
		if (!s->in_use && s->len == len && memcmp(s->sql, sql, len) == 0) {
			s->last_used = d->tick;
			*slot = i;
			/* Normally a no-op; after an error thrown mid-step it ends the old run. */
			sqlite3_reset(s->stmt);
			return s->stmt;
		}
		if (!s->in_use && (victim < 0 || s->last_used < d->cache[victim].last_used))
			victim = i;
	}

	*rc = sqlite3_prepare_v3(d->db, sql, (int)len + 1, SQLITE_PREPARE_PERSISTENT, &stmt, &tail);
	if (*rc != SQLITE_OK)
		return NULL;
	if (stmt == NULL) /* only whitespace or comments */
		luaL_error(L, "ops.store: SQL contains no statement");
	if (tail != NULL && *tail != '\0') {
		*rc = sqlite3_prepare_v2(d->db, tail, -1, &extra, NULL);
		sqlite3_finalize(extra);
		if (*rc != SQLITE_OK || extra != NULL) {
			sqlite3_finalize(stmt);
			luaL_error(L, "ops.store: exec/query/rows run one statement; use exec_script for several");
		}
	}

	if (free_slot < 0 && victim >= 0) {
		slot_clear(&d->cache[victim]);
		free_slot = victim;
	}
	if (free_slot >= 0) {
		char *copy = malloc(len + 1);
		if (copy != NULL) {
			cache_slot *s = &d->cache[free_slot];
			memcpy(copy, sql, len + 1);
			s->sql = copy;
			s->len = len;
			s->stmt = stmt;
			s->in_use = 0;
			s->last_used = d->tick;
			*slot = free_slot;
			return stmt;
		}
	}
	*slot = -1;
	return stmt;
}

static void release_stmt(store_db *d, sqlite3_stmt *stmt, int slot)
{
	if (d->db == NULL || stmt == NULL)
		return;
	if (slot >= 0 && d->cache[slot].stmt == stmt) {
		sqlite3_reset(stmt);
		sqlite3_clear_bindings(stmt);
		d->cache[slot].in_use = 0;
	} else {
		sqlite3_finalize(stmt);
	}
}

/* ---- binding ------------------------------------------------------------ */

static int bind_value(lua_State *L, sqlite3_stmt *stmt, int param, int idx)
{
	switch (lua_type(L, idx)) {
	case LUA_TNIL:
		return sqlite3_bind_null(stmt, param);
	case LUA_TBOOLEAN:
		return sqlite3_bind_int(stmt, param, lua_toboolean(L, idx));
	case LUA_TNUMBER:
		if (lua_isinteger(L, idx))
			return sqlite3_bind_int64(stmt, param, (sqlite3_int64)lua_tointeger(L, idx));
		return sqlite3_bind_double(stmt, param, (double)lua_tonumber(L, idx));
	case LUA_TSTRING: {
		size_t n;
		const char *s = lua_tolstring(L, idx, &n);
		return sqlite3_bind_text64(stmt, param, s, n, SQLITE_TRANSIENT, SQLITE_UTF8);
	}
	default:
		return -1;
	}
}

/*
 * Binds the Lua values at indexes first..last. A single table argument binds
 * named parameters (:name, @name, $name) from its fields; otherwise each value
 * binds the positional parameter with its number. Returns NULL on success or an
 * error message (the caller raises after releasing the statement).
 */
static const char *bind_args(lua_State *L, sqlite3_stmt *stmt, int first, int last)
{
	int nargs = last - first + 1;
	int nparams = sqlite3_bind_parameter_count(stmt);

	if (nargs == 1 && lua_type(L, first) == LUA_TTABLE) {
		for (int p = 1; p <= nparams; p++) {
			const char *name = sqlite3_bind_parameter_name(stmt, p);
			int rc;
			if (name == NULL || name[0] == '?')
				return lua_pushfstring(L, "parameter %d is positional but a table of named values was given", p);
			lua_getfield(L, first, name + 1);
			rc = bind_value(L, stmt, p, -1);
			if (rc < 0) {
				const char *tn = luaL_typename(L, -1);
				lua_pop(L, 1);
				return lua_pushfstring(L, "parameter %s: cannot bind a %s", name, tn);
			}
			lua_pop(L, 1);
			if (rc != SQLITE_OK)
				return lua_pushfstring(L, "parameter %s: %s", name, sqlite3_errstr(rc));
		}
		return NULL;
	}
	if (nargs != nparams)
		return lua_pushfstring(L, "statement has %d parameter(s) but %d value(s) were given", nparams, nargs);
	for (int p = 1; p <= nparams; p++) {
		int rc = bind_value(L, stmt, p, first + p - 1);
		if (rc < 0)
			return lua_pushfstring(L, "parameter %d: cannot bind a %s", p, luaL_typename(L, first + p - 1));
		if (rc != SQLITE_OK)
			return lua_pushfstring(L, "parameter %d: %s", p, sqlite3_errstr(rc));
	}
	return NULL;
}

/*
 * Prepares (or reuses) the statement for the SQL at index 2 and binds the
 * arguments at indexes 3..last. On an SQLite error pushes nil, msg, code and returns NULL;
 * *nret is then 3. Misuse raises.
 */
static sqlite3_stmt *prepare_bound(lua_State *L, store_db *d, int last, int *slot, int *nret)
{
	size_t len;
	const char *sql = luaL_checklstring(L, 2, &len);
	int rc = SQLITE_OK;
	const char *bind_err;
	sqlite3_stmt *stmt;

	luaL_argcheck(L, len < INT_MAX, 2, "SQL text too long");
	stmt = acquire_stmt(L, d, sql, len, slot, &rc);

	if (stmt == NULL) {
		*nret = push_sqlite_error(L, d->db, rc);
		return NULL;
	}
	bind_err = bind_args(L, stmt, 3, last);
	if (bind_err != NULL) {
		release_stmt(d, stmt, *slot);
		luaL_error(L, "ops.store: %s", bind_err);
	}
	return stmt;
}

static void push_column(lua_State *L, sqlite3_stmt *stmt, int col)
{
	switch (sqlite3_column_type(stmt, col)) {
	case SQLITE_INTEGER:
		lua_pushinteger(L, (lua_Integer)sqlite3_column_int64(stmt, col));
		break;
	case SQLITE_FLOAT:
		lua_pushnumber(L, (lua_Number)sqlite3_column_double(stmt, col));
		break;
	case SQLITE_TEXT:
		lua_pushlstring(L, (const char *)sqlite3_column_text(stmt, col),
				(size_t)sqlite3_column_bytes(stmt, col));
		break;
	case SQLITE_BLOB: {
		const void *p = sqlite3_column_blob(stmt, col);
		lua_pushlstring(L, p ? (const char *)p : "", (size_t)sqlite3_column_bytes(stmt, col));
		break;
	}
	default:
		lua_pushnil(L);
		break;
	}
}

/* Pushes the current row as a table of column name -> value (NULL is absent). */
static void push_row(lua_State *L, sqlite3_stmt *stmt, int ncols)
{
	lua_createtable(L, 0, ncols);
	for (int c = 0; c < ncols; c++) {
		if (sqlite3_column_type(stmt, c) == SQLITE_NULL)
			continue;
		push_column(L, stmt, c);
		lua_setfield(L, -2, sqlite3_column_name(stmt, c));
	}
}

/* ---- db methods --------------------------------------------------------- */

/* Replaces SQLite's autocheckpoint: counts the WAL's frames for db:wal_frames(). */
static int wal_count_hook(void *arg, sqlite3 *db, const char *name, int frames)
{
	(void)db;
	if (strcmp(name, "main") == 0)
		((store_db *)arg)->wal_frames = frames;
	return SQLITE_OK;
}

/* store.open(path [, opts]) -> db | nil, err, code */
static int store_open(lua_State *L)
{
	const char *path = luaL_checkstring(L, 1);
	int autocheckpoint = 1;
	lua_Integer busy_ms = DEFAULT_BUSY_TIMEOUT_MS;
	const char *sync_pragma = "PRAGMA synchronous=FULL";
	const char *mode;
	store_db *d;
	sqlite3_stmt *st = NULL;
	int rc;

	if (!lua_isnoneornil(L, 2)) {
		luaL_checktype(L, 2, LUA_TTABLE);
		lua_getfield(L, 2, "busy_timeout");
		if (!lua_isnil(L, -1)) {
			busy_ms = luaL_checkinteger(L, -1);
			luaL_argcheck(L, busy_ms >= 0 && busy_ms <= 3600000, 2, "busy_timeout must be 0..3600000 ms");
		}
		lua_pop(L, 1);
		lua_getfield(L, 2, "synchronous");
		if (!lua_isnil(L, -1)) {
			const char *s = luaL_checkstring(L, -1);
			if (strcmp(s, "normal") == 0)
				sync_pragma = "PRAGMA synchronous=NORMAL";
			else if (strcmp(s, "full") != 0)
				luaL_argerror(L, 2, "synchronous must be \"full\" or \"normal\"");
		}
		lua_pop(L, 1);
		lua_getfield(L, 2, "autocheckpoint");
		if (!lua_isnil(L, -1)) {
			luaL_argcheck(L, lua_isboolean(L, -1), 2, "autocheckpoint must be a boolean");
			autocheckpoint = lua_toboolean(L, -1);
		}
		lua_pop(L, 1);
	}

	d = (store_db *)lua_newuserdatauv(L, sizeof(*d), 0);
	memset(d, 0, sizeof(*d));
	luaL_setmetatable(L, DB_MT);

	d->path = strdup(path);
	if (d->path == NULL)
		return luaL_error(L, "ops.store: out of memory");
	/* NOMUTEX: a connection is only ever used by the loop thread (db:checkpoint opens its own) */
	rc = sqlite3_open_v2(path, &d->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, NULL);
	if (rc != SQLITE_OK)
		goto fail;
	sqlite3_extended_result_codes(d->db, 0);
	sqlite3_busy_timeout(d->db, (int)busy_ms);

	/* journal_mode reads the header first: a file that isn't a database fails here. */
	rc = sqlite3_prepare_v2(d->db, "PRAGMA journal_mode=WAL", -1, &st, NULL);
	if (rc != SQLITE_OK)
		goto fail;
	rc = sqlite3_step(st);
	if (rc != SQLITE_ROW) {
		rc = sqlite3_finalize(st);
		goto fail;
	}
	mode = (const char *)sqlite3_column_text(st, 0);
	if (mode == NULL || (strcmp(mode, "wal") != 0 && strcmp(mode, "memory") != 0)) {
		lua_pushnil(L);
		lua_pushfstring(L, "SQLITE_CANTOPEN: cannot use WAL journal mode (got %s): %s",
				mode ? mode : "nothing", path);
		lua_pushliteral(L, "SQLITE_CANTOPEN");
		sqlite3_finalize(st);
		db_release(d);
		return 3;
	}
	sqlite3_finalize(st);
	rc = sqlite3_exec(d->db, sync_pragma, NULL, NULL, NULL);
	if (rc == SQLITE_OK)
		rc = sqlite3_exec(d->db, "PRAGMA foreign_keys=ON", NULL, NULL, NULL);
	if (rc != SQLITE_OK)
		goto fail;
	if (!autocheckpoint)
		sqlite3_wal_hook(d->db, wal_count_hook, d); /* commits no longer checkpoint */
	return 1;

fail: {
	const char *code = primary_code_name(rc);
	lua_pushnil(L);
	lua_pushfstring(L, "%s: %s: %s", code, d->db ? sqlite3_errmsg(d->db) : sqlite3_errstr(rc), path);
	lua_pushstring(L, code);
	db_release(d);
	return 3;
}
}

/* db:exec(sql, ...) -> changes, last_insert_rowid | nil, err, code */
static int db_exec(lua_State *L)
{
	store_db *d = check_open_db(L, 1);
	int slot = -1, nret = 0, rc;
	sqlite3_int64 before = sqlite3_total_changes64(d->db);
	sqlite3_stmt *stmt = prepare_bound(L, d, lua_gettop(L), &slot, &nret);

	if (stmt == NULL)
		return nret;
	while ((rc = sqlite3_step(stmt)) == SQLITE_ROW)
		;
	if (rc != SQLITE_DONE) {
		nret = push_sqlite_error(L, d->db, rc);
		release_stmt(d, stmt, slot);
		return nret;
	}
	release_stmt(d, stmt, slot);
	/* sqlite3_changes64 keeps the count of the last INSERT/UPDATE/DELETE, even
	 * after a SELECT or DDL; report 0 for statements that changed nothing. */
	lua_pushinteger(L, sqlite3_total_changes64(d->db) == before ? 0 : (lua_Integer)sqlite3_changes64(d->db));
	lua_pushinteger(L, (lua_Integer)sqlite3_last_insert_rowid(d->db));
	return 2;
}

/* db:query(sql, ...) -> { row, ... } | nil, err, code */
static int db_query(lua_State *L)
{
	store_db *d = check_open_db(L, 1);
	int slot = -1, nret = 0, rc, ncols;
	lua_Integer n = 0;
	sqlite3_stmt *stmt = prepare_bound(L, d, lua_gettop(L), &slot, &nret);

	if (stmt == NULL)
		return nret;
	ncols = sqlite3_column_count(stmt);
	lua_newtable(L);
	while ((rc = sqlite3_step(stmt)) == SQLITE_ROW) {
		push_row(L, stmt, ncols);
		lua_rawseti(L, -2, ++n);
	}
	if (rc != SQLITE_DONE) {
		nret = push_sqlite_error(L, d->db, rc);
		release_stmt(d, stmt, slot);
		return nret;
	}
	release_stmt(d, stmt, slot);
	return 1;
}

static void cursor_finish(store_cursor *c)
{
	if (c->stmt != NULL && c->owner != NULL)
		release_stmt(c->owner, c->stmt, c->slot);
	c->stmt = NULL;
}

static int cursor_next(lua_State *L)
{
	store_cursor *c = (store_cursor *)luaL_checkudata(L, lua_upvalueindex(1), CURSOR_MT);
	int rc;

	if (c->stmt == NULL)
		return 0;
	if (c->owner->db == NULL) {
		c->stmt = NULL; /* finalized by close() */
		return luaL_error(L, "ops.store: database closed while iterating rows");
	}
	rc = sqlite3_step(c->stmt);
	if (rc == SQLITE_ROW) {
		push_row(L, c->stmt, c->ncols);
		return 1;
	}
	if (rc == SQLITE_DONE) {
		cursor_finish(c);
		return 0;
	}
	lua_pushfstring(L, "%s: %s", primary_code_name(rc), sqlite3_errmsg(c->owner->db));
	cursor_finish(c);
	return lua_error(L);
}

/*
 * db:rows(sql, ...) -> iterator, nil, nil, cursor | nil, err, code
 * The fourth value closes the statement when a generic for exits early.
 * The iterator raises "CODE: message" if a step fails.
 */
static int db_rows(lua_State *L)
{
	store_db *d = check_open_db(L, 1);
	int last = lua_gettop(L), slot = -1, nret = 0;
	store_cursor *c;
	sqlite3_stmt *stmt;

	/* The cursor exists before the statement, so no error can leak the statement. */
	c = (store_cursor *)lua_newuserdatauv(L, sizeof(*c), 1);
	memset(c, 0, sizeof(*c));
	c->slot = -1;
	luaL_setmetatable(L, CURSOR_MT);
	lua_pushvalue(L, 1);
	lua_setiuservalue(L, -2, 1);

	stmt = prepare_bound(L, d, last, &slot, &nret);
	if (stmt == NULL)
		return nret;
	c->owner = d;
	c->stmt = stmt;
	c->slot = slot;
	c->ncols = sqlite3_column_count(stmt);
	if (slot >= 0)
		d->cache[slot].in_use = 1;

	lua_pushvalue(L, last + 1);
	lua_pushcclosure(L, cursor_next, 1);
	lua_pushnil(L);
	lua_pushnil(L);
	lua_pushvalue(L, last + 1);
	return 4;
}

static int cursor_close(lua_State *L)
{
	store_cursor *c = (store_cursor *)luaL_checkudata(L, 1, CURSOR_MT);
	cursor_finish(c);
	return 0;
}

static int cursor_tostring(lua_State *L)
{
	store_cursor *c = (store_cursor *)luaL_checkudata(L, 1, CURSOR_MT);
	lua_pushfstring(L, "ops.store.cursor (%s)", c->stmt ? "open" : "finished");
	return 1;
}

/* db:exec_script(sql) -> true | nil, err, code   (several statements, no parameters) */
static int db_exec_script(lua_State *L)
{
	store_db *d = check_open_db(L, 1);
	const char *sql = luaL_checkstring(L, 2);
	char *errmsg = NULL;
	int rc = sqlite3_exec(d->db, sql, NULL, NULL, &errmsg);

	if (rc != SQLITE_OK) {
		const char *code = primary_code_name(rc);
		lua_pushnil(L);
		lua_pushfstring(L, "%s: %s", code, errmsg ? errmsg : sqlite3_errstr(rc));
		lua_pushstring(L, code);
		sqlite3_free(errmsg);
		return 3;
	}
	lua_pushboolean(L, 1);
	return 1;
}

/* db:close() -> true | nil, err, code   (closing twice is a no-op) */
static int db_close(lua_State *L)
{
	store_db *d = check_db(L, 1);
	int rc = db_release(d);
	if (rc != SQLITE_OK)
		return push_sqlite_error(L, NULL, rc);
	lua_pushboolean(L, 1);
	return 1;
}

static int db_gc(lua_State *L)
{
	db_release(check_db(L, 1));
	return 0;
}

/* db:in_transaction() -> boolean  (false in autocommit mode) */
static int db_in_transaction(lua_State *L)
{
	store_db *d = check_open_db(L, 1);
	lua_pushboolean(L, !sqlite3_get_autocommit(d->db));
	return 1;
}

static int db_tostring(lua_State *L)
{
	store_db *d = check_db(L, 1);
	if (d->db == NULL)
		lua_pushliteral(L, "ops.store.db (closed)");
	else
		lua_pushfstring(L, "ops.store.db (%s)", d->path);
	return 1;
}

/* A WAL flush in flight on libuv's thread pool. If the waiting task goes away first, the
 * flush still runs to its end; its completion then has nobody to wake. */
typedef struct {
	uv_fs_t req;
	ops_wait w;
	int fd;
} wal_sync;

static void wal_sync_cancel(ops_wait *w)
{
	(void)w;
}

/* Pushes nil, "CODE: cannot <what>: reason", CODE for a libuv failure; returns 3. */
static int push_uv_error(lua_State *L, int rc, const char *what)
{
	lua_pushnil(L);
	lua_pushfstring(L, "%s: cannot %s: %s", uv_err_name(rc), what, uv_strerror(rc));
	lua_pushstring(L, uv_err_name(rc));
	return 3;
}

static void wal_sync_done(uv_fs_t *req)
{
	wal_sync *s = req->data;
	int result = (int)req->result;
	lua_State *co = ops_wait_thread(&s->w);
	uv_fs_req_cleanup(req);
	close(s->fd);
	if (co != NULL) {
		lua_checkstack(co, 3);
		if (result < 0) {
			ops_wait_complete(&s->w, push_uv_error(co, result, "flush the store's WAL"));
		} else {
			lua_pushboolean(co, 1);
			ops_wait_complete(&s->w, 1);
		}
	}
	free(s);
}

/* db:sync() -> true | nil, err, code
 * Makes every commit so far durable, as synchronous=FULL would have, with the fdatasync of
 * the WAL done on libuv's thread pool: the loop goes on serving while the disk works, and
 * many commits share one flush. Meant for connections opened with synchronous="normal". */
static int db_sync(lua_State *L)
{
	store_db *d = check_open_db(L, 1);
	const char *file = sqlite3_db_filename(d->db, "main");
	char wal[PATH_MAX];
	int fd, rc;
	wal_sync *s;
	ops_check_task(L, "db:sync");
	if (file == NULL || *file == '\0' || snprintf(wal, sizeof wal, "%s-wal", file) >= (int)sizeof wal) {
		lua_pushboolean(L, 1); /* in memory: nothing to flush */
		return 1;
	}
	fd = open(wal, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		int e = errno; /* pushing strings may run a __gc that changes errno */
		if (e == ENOENT) { /* not in WAL mode: commits were synced as they happened */
			lua_pushboolean(L, 1);
			return 1;
		}
		lua_pushnil(L);
		lua_pushfstring(L, "%s: cannot open %s: %s", uv_err_name(-e), wal, strerror(e));
		lua_pushstring(L, uv_err_name(-e));
		return 3;
	}
	s = calloc(1, sizeof *s);
	if (s == NULL) {
		close(fd);
		return luaL_error(L, "out of memory");
	}
	s->fd = fd;
	s->req.data = s;
	s->w.cancel = wal_sync_cancel;
	rc = uv_fs_fdatasync(ops_loop(), &s->req, fd, wal_sync_done);
	if (rc < 0) {
		close(fd);
		free(s);
		return push_uv_error(L, rc, "flush the store's WAL");
	}
	return ops_wait_begin(L, &s->w, -1);
}

/* db:wal_frames() -> frames in the WAL after this connection's last commit (counted only
 * for a db opened with autocheckpoint = false; 0 otherwise) */
static int db_wal_frames(lua_State *L)
{
	store_db *d = check_open_db(L, 1);
	lua_pushinteger(L, d->wal_frames);
	return 1;
}

/* A checkpoint in flight on libuv's thread pool, through a connection of its own (opened,
 * used and closed on the worker thread). If the waiting task goes away first, the
 * checkpoint still runs to its end. */
typedef struct {
	uv_work_t req;
	ops_wait w;
	char *path;
	int rc, log, done;
	char err[256];
} wal_checkpoint;

static void checkpoint_cancel(ops_wait *w)
{
	(void)w;
}

static void checkpoint_work(uv_work_t *req)
{
	wal_checkpoint *c = req->data;
	sqlite3 *db = NULL;
	c->log = c->done = -1;
	c->rc = sqlite3_open_v2(c->path, &db, SQLITE_OPEN_READWRITE, NULL);
	/* FULL: the WAL is synced before its frames are copied, the database after */
	if (c->rc == SQLITE_OK)
		c->rc = sqlite3_exec(db, "PRAGMA synchronous=FULL", NULL, NULL, NULL);
	if (c->rc == SQLITE_OK)
		c->rc = sqlite3_wal_checkpoint_v2(db, "main", SQLITE_CHECKPOINT_PASSIVE, &c->log, &c->done);
	if (c->rc != SQLITE_OK)
		snprintf(c->err, sizeof c->err, "%s", db ? sqlite3_errmsg(db) : sqlite3_errstr(c->rc));
	sqlite3_close_v2(db);
}

static void checkpoint_done(uv_work_t *req, int status)
{
	wal_checkpoint *c = req->data;
	lua_State *co = ops_wait_thread(&c->w);
	if (co != NULL) {
		lua_checkstack(co, 3);
		if (status < 0) {
			ops_wait_complete(&c->w, push_uv_error(co, status, "checkpoint the store"));
		} else if (c->rc != SQLITE_OK) {
			const char *code = primary_code_name(c->rc);
			lua_pushnil(co);
			lua_pushfstring(co, "%s: cannot checkpoint %s: %s", code, c->path, c->err);
			lua_pushstring(co, code);
			ops_wait_complete(&c->w, 3);
		} else {
			lua_pushinteger(co, c->log);
			lua_pushinteger(co, c->done);
			ops_wait_complete(&c->w, 2);
		}
	}
	free(c->path);
	free(c);
}

/* db:checkpoint() -> wal_frames, checkpointed_frames | nil, err, code
 * A PASSIVE checkpoint (copies what it can of the WAL into the database, waits for no one)
 * run on libuv's thread pool, so the loop goes on meanwhile. Meant for a db opened with
 * autocheckpoint = false, whose commits no longer checkpoint by themselves. */
static int db_checkpoint(lua_State *L)
{
	store_db *d = check_open_db(L, 1);
	const char *file = sqlite3_db_filename(d->db, "main");
	wal_checkpoint *c;
	int rc;
	ops_check_task(L, "db:checkpoint");
	if (file == NULL || *file == '\0') { /* in memory: no WAL */
		lua_pushinteger(L, 0);
		lua_pushinteger(L, 0);
		return 2;
	}
	c = calloc(1, sizeof *c);
	if (c == NULL || (c->path = strdup(file)) == NULL) {
		free(c);
		return luaL_error(L, "out of memory");
	}
	c->req.data = c;
	c->w.cancel = checkpoint_cancel;
	rc = uv_queue_work(ops_loop(), &c->req, checkpoint_work, checkpoint_done);
	if (rc < 0) {
		free(c->path);
		free(c);
		return push_uv_error(L, rc, "checkpoint the store");
	}
	return ops_wait_begin(L, &c->w, -1);
}

/* store.now() -> wall-clock seconds since the epoch, as a float */
static int store_now(lua_State *L)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	lua_pushnumber(L, (lua_Number)ts.tv_sec + (lua_Number)ts.tv_nsec / 1e9);
	return 1;
}

static const luaL_Reg db_methods[] = {
	{"exec", db_exec},
	{"query", db_query},
	{"rows", db_rows},
	{"exec_script", db_exec_script},
	{"in_transaction", db_in_transaction},
	{"sync", db_sync},
	{"checkpoint", db_checkpoint},
	{"wal_frames", db_wal_frames},
	{"close", db_close},
	{NULL, NULL},
};

static const luaL_Reg db_meta[] = {
	{"__gc", db_gc},
	{"__close", db_gc},
	{"__tostring", db_tostring},
	{NULL, NULL},
};

static const luaL_Reg cursor_meta[] = {
	{"__gc", cursor_close},
	{"__close", cursor_close},
	{"__tostring", cursor_tostring},
	{NULL, NULL},
};

static const luaL_Reg store_funcs[] = {
	{"open", store_open},
	{"now", store_now},
	{NULL, NULL},
};

int luaopen_ops_core_store(lua_State *L)
{
	/* No global memory statistics: with them every SQLite malloc and free takes a global
	 * mutex. Refused (harmlessly) if SQLite was already initialized. */
	sqlite3_config(SQLITE_CONFIG_MEMSTATUS, 0);
	luaL_newmetatable(L, DB_MT);
	luaL_setfuncs(L, db_meta, 0);
	luaL_newlib(L, db_methods);
	lua_setfield(L, -2, "__index");
	lua_pop(L, 1);

	luaL_newmetatable(L, CURSOR_MT);
	luaL_setfuncs(L, cursor_meta, 0);
	lua_pop(L, 1);

	luaL_newlib(L, store_funcs);
	luaL_getmetatable(L, DB_MT);
	lua_getfield(L, -1, "__index");
	lua_setfield(L, -3, "methods");
	lua_pop(L, 1);
	return 1;
}
