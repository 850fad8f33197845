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

typedef struct batch_conn batch_conn;

typedef struct {
	sqlite3 *db; /* NULL once closed */
	char *path;
	int wal_frames; /* frames in the WAL after the last commit (autocheckpoint = false only) */
	int autocheckpoint, busy_ms, sync_normal;
	batch_conn *batch; /* db:batch's own connection, NULL until the first batch */
	/* db:batch_stats(): the batches run on that connection, and the time (ns) they spent
	 * in each phase of their way, added up on the loop as each comes back */
	uint64_t batches, batch_statements, batch_ns[4];
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
static void batch_conn_release(batch_conn *b);

static int db_release(store_db *d)
{
	int rc;
	sqlite3_stmt *st;

	if (d->db == NULL)
		return SQLITE_OK;
	batch_conn_release(d->batch);
	d->batch = NULL;
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
	const char *path = ops_checkpath(L, 1);
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
	d->busy_ms = (int)busy_ms;
	d->autocheckpoint = autocheckpoint;
	d->sync_normal = strcmp(sync_pragma, "PRAGMA synchronous=NORMAL") == 0;

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

static int query(lua_State *L, int only_reads)
{
	store_db *d = check_open_db(L, 1);
	int slot = -1, nret = 0, rc, ncols;
	lua_Integer n = 0;
	sqlite3_stmt *stmt = prepare_bound(L, d, lua_gettop(L), &slot, &nret);

	if (stmt == NULL)
		return nret;
	if (only_reads && !sqlite3_stmt_readonly(stmt)) {
		release_stmt(d, stmt, slot);
		lua_pushboolean(L, 0);
		return 1;
	}
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

/* db:query(sql, ...) -> { row, ... } | nil, err, code */
static int db_query(lua_State *L)
{
	return query(L, 0);
}

/* core: db:_read(sql, ...) -> { row, ... } | nil, err, code | false (the statement writes:
 * it did not run) */
static int db_read(lua_State *L)
{
	return query(L, 1);
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

/* db:batch_stats() -> {batches =, statements =, waiting =, committing =, flushing =,
 * returning =}: the batches db:batch ran on its own connection since the db was opened
 * (each a transaction of its own, or sharing one with the batches queued beside it), their
 * statements, and the seconds they spent, added up, waiting for the connection's thread,
 * in their transaction, waiting for the WAL's flush (durable batches) and waiting for the
 * loop to take them back. Batches run inside the caller's transaction are not counted. */
static int db_batch_stats(lua_State *L)
{
	static const char *const phase[] = {"waiting", "committing", "flushing", "returning"};
	store_db *d = check_open_db(L, 1);
	lua_createtable(L, 0, 6);
	lua_pushinteger(L, (lua_Integer)d->batches);
	lua_setfield(L, -2, "batches");
	lua_pushinteger(L, (lua_Integer)d->batch_statements);
	lua_setfield(L, -2, "statements");
	for (int i = 0; i < 4; i++) {
		lua_pushnumber(L, (lua_Number)d->batch_ns[i] / 1e9);
		lua_setfield(L, -2, phase[i]);
	}
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

/* ---- db:batch: statements run in one transaction, on libuv's thread pool ---- */

#define BATCH_CACHE_SIZE 16
#define BATCH_MAX_ARGS 32766 /* SQLite's default limit of parameters */

typedef struct {
	char *sql; /* NULL when the slot is free */
	size_t len;
	sqlite3_stmt *stmt;
	unsigned long last_used;
} batch_slot;

/* The connection db:batch runs its statements through, and the thread of its own that
 * runs them. The loop hands batches to the thread through `queue`; the thread runs every
 * batch waiting there when it comes round as one transaction (each batch in a savepoint of
 * it, so each is still all or nothing), then hands them back through `done` and wakes the
 * loop (`async`). A batch that arrives while another runs starts as soon as that one ends,
 * without a round trip through the loop. A durable batch goes from the commit to a second
 * thread, the flusher, which syncs the WAL (one fdatasync for every batch committed
 * meanwhile) while the first goes on with the next batch: SQLite's write lock is not held
 * during the flush.
 * Made by the first batch; closed by the loop once no batch is in flight (by the last
 * batch's completion if the db was closed while it ran). */
struct batch_conn {
	sqlite3 *db; /* opened and used by the thread only (and closed after it ended) */
	char *path;
	int busy_ms, sync_normal, autocheckpoint;
	/* the loop's side */
	int in_flight; /* batches handed to the thread and not yet back */
	int orphaned;  /* the db was closed: close this too when the last batch is back */
	int thread_started, async_ready;
	uv_async_t async;
	/* shared, under lock */
	uv_mutex_t lock;
	uv_cond_t wake, flush_wake;
	uv_thread_t thread, flusher;
	int flusher_started;
	struct batch_job *queue, *queue_tail; /* waiting for the thread, in order */
	struct batch_job *flush, *flush_tail; /* committed, waiting for the WAL's flush */
	struct batch_job *done, *done_tail;   /* back from them, for the loop */
	sqlite3_file *wal;                    /* the WAL the flusher syncs, once a batch committed */
	int flushing;                         /* a thread is syncing it */
	int stop;
	/* the thread's side */
	int wal_frames; /* written by its WAL hook, read by the batch that committed */
	unsigned long tick;
	batch_slot cache[BATCH_CACHE_SIZE];
	/* prepared once: BEGIN IMMEDIATE, COMMIT, ROLLBACK, and a grouped batch's savepoint */
	sqlite3_stmt *control[6];
};

enum { BATCH_BEGIN, BATCH_COMMIT, BATCH_ROLLBACK, BATCH_SAVEPOINT, BATCH_RELEASE, BATCH_ROLLBACK_TO };
static const char *const batch_control_sql[] = {"BEGIN IMMEDIATE",     "COMMIT",	       "ROLLBACK",
						"SAVEPOINT ops_batch", "RELEASE ops_batch", "ROLLBACK TO ops_batch"};

/* Runs one of the connection's control statements (prepared on first use). */
static int batch_control(batch_conn *b, int which)
{
	sqlite3_stmt **st = &b->control[which];
	int rc;
	if (*st == NULL && (rc = sqlite3_prepare_v3(b->db, batch_control_sql[which], -1, SQLITE_PREPARE_PERSISTENT, st,
						    NULL)) != SQLITE_OK)
		return rc;
	while ((rc = sqlite3_step(*st)) == SQLITE_ROW)
		;
	sqlite3_reset(*st);
	return rc == SQLITE_DONE ? SQLITE_OK : rc;
}

typedef struct {
	int type; /* SQLITE_INTEGER, SQLITE_FLOAT, SQLITE_TEXT, SQLITE_BLOB or SQLITE_NULL */
	sqlite3_int64 i;
	double d;
	const char *s; /* text: in the job's arena (arguments) or its own allocation (results) */
	size_t n;
} batch_value;

typedef struct {
	const char *sql;
	size_t sql_len;
	int nargs;
	batch_value *args;
	/* what it gave: changes and rowid, or rows when it has result columns */
	sqlite3_int64 changes, rowid;
	int ncols;
	char **names;
	size_t nrows, cap;
	batch_value *cells; /* nrows * ncols, row by row */
} batch_stmt;

typedef struct batch_job {
	ops_wait w;
	struct batch_job *next; /* in its connection's queue, then its done list */
	store_db *owner; /* pinned by db_ref while the batch is in flight */
	batch_conn *conn;
	int db_ref;
	int nstmts;
	batch_stmt *stmts;
	batch_value *values; /* every statement's arguments */
	char *arena;         /* their SQL texts and text arguments */
	int rc, misuse, frames;
	int durable; /* the WAL flushed after the commit: on disk when the batch ends */
	/* uv_hrtime() at each step of its way: handed to the thread (loop), taken by it,
	 * committed (or failed), flushed (the commit's time when not durable) */
	uint64_t t_start, t_taken, t_committed, t_flushed;
	char err[512];
} batch_job;

static void batch_conn_free(uv_handle_t *h)
{
	batch_conn *b = h->data;
	uv_cond_destroy(&b->flush_wake);
	uv_cond_destroy(&b->wake);
	uv_mutex_destroy(&b->lock);
	free(b->path);
	free(b);
}

/* On the loop, with no batch in flight: ends the thread, closes the connection. */
static void batch_conn_close(batch_conn *b)
{
	uv_mutex_lock(&b->lock);
	b->stop = 1;
	uv_cond_signal(&b->wake);
	uv_cond_signal(&b->flush_wake);
	uv_mutex_unlock(&b->lock);
	if (b->thread_started) /* idle: they end at once */
		uv_thread_join(&b->thread);
	if (b->flusher_started)
		uv_thread_join(&b->flusher);
	b->thread_started = b->flusher_started = 0;
	for (int i = 0; i < BATCH_CACHE_SIZE; i++) {
		sqlite3_finalize(b->cache[i].stmt);
		free(b->cache[i].sql);
	}
	for (size_t i = 0; i < sizeof b->control / sizeof b->control[0]; i++)
		sqlite3_finalize(b->control[i]);
	sqlite3_close_v2(b->db);
	b->db = NULL;
	if (b->async_ready)
		uv_close((uv_handle_t *)&b->async, batch_conn_free);
	else
		batch_conn_free((uv_handle_t *)&b->async);
}

/* The db is closed: its batch connection goes now, or after the batches in flight and
 * waiting. */
static void batch_conn_release(batch_conn *b)
{
	if (b == NULL)
		return;
	if (b->in_flight)
		b->orphaned = 1;
	else
		batch_conn_close(b);
}

static batch_conn *batch_conn_new(const char *path, const store_db *d)
{
	batch_conn *b = calloc(1, sizeof *b);
	if (b == NULL)
		return NULL;
	if ((b->path = strdup(path)) == NULL || uv_mutex_init(&b->lock) != 0)
		goto no_lock;
	if (uv_cond_init(&b->wake) != 0)
		goto no_wake;
	if (uv_cond_init(&b->flush_wake) != 0)
		goto no_flush_wake;
	b->async.data = b;
	b->busy_ms = d->busy_ms;
	b->sync_normal = d->sync_normal;
	b->autocheckpoint = d->autocheckpoint;
	return b;
no_flush_wake:
	uv_cond_destroy(&b->wake);
no_wake:
	uv_mutex_destroy(&b->lock);
no_lock:
	free(b->path);
	free(b);
	return NULL;
}

static int batch_wal_hook(void *arg, sqlite3 *db, const char *name, int frames)
{
	(void)db;
	if (strcmp(name, "main") == 0)
		((batch_conn *)arg)->wal_frames = frames;
	return SQLITE_OK;
}

static int batch_conn_open(batch_conn *b)
{
	int rc = sqlite3_open_v2(b->path, &b->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL);
	if (rc == SQLITE_OK) {
		sqlite3_extended_result_codes(b->db, 0);
		sqlite3_busy_timeout(b->db, b->busy_ms);
		rc = sqlite3_exec(b->db, b->sync_normal ? "PRAGMA synchronous=NORMAL" : "PRAGMA synchronous=FULL",
				  NULL, NULL, NULL);
	}
	if (rc == SQLITE_OK)
		rc = sqlite3_exec(b->db, "PRAGMA foreign_keys=ON", NULL, NULL, NULL);
	if (rc == SQLITE_OK && !b->autocheckpoint)
		sqlite3_wal_hook(b->db, batch_wal_hook, b);
	return rc;
}

static void batch_fail(batch_job *j, sqlite3 *db, int rc, int index, const char *what)
{
	j->rc = rc;
	if (index > 0)
		snprintf(j->err, sizeof j->err, "%s: %s (statement %d of the batch)", primary_code_name(rc),
			 what ? what : sqlite3_errmsg(db), index);
	else
		snprintf(j->err, sizeof j->err, "%s: %s", primary_code_name(rc), what ? what : sqlite3_errmsg(db));
}

/* A prepared statement for sql: from b's cache (the batch's connection), or d's (the db's
 * own connection, for a batch run there: *slot then says which slot it holds), or (neither,
 * or the cache full of it) one of its own, which *own then says the caller finalizes. */
static sqlite3_stmt *batch_prepare(batch_job *j, sqlite3 *db, batch_conn *b, store_db *d, batch_stmt *bs, int index,
				   int *own, int *slot)
{
	sqlite3_stmt *stmt = NULL;
	const char *tail = NULL;
	int victim = -1, free_slot = -1, rc;
	*own = 1;
	*slot = -1;
	if (d != NULL) {
		d->tick++;
		for (int i = 0; i < STMT_CACHE_SIZE; i++) {
			cache_slot *c = &d->cache[i];
			if (c->sql == NULL) {
				if (free_slot < 0)
					free_slot = i;
				continue;
			}
			if (!c->in_use && c->len == bs->sql_len && memcmp(c->sql, bs->sql, c->len) == 0) {
				c->last_used = d->tick;
				c->in_use = 1;
				sqlite3_reset(c->stmt);
				*own = 0;
				*slot = i;
				return c->stmt;
			}
			if (!c->in_use && (victim < 0 || c->last_used < d->cache[victim].last_used))
				victim = i;
		}
		if (free_slot >= 0)
			victim = free_slot;
	} else if (b != NULL) {
		b->tick++;
		for (int i = 0; i < BATCH_CACHE_SIZE; i++) {
			batch_slot *s = &b->cache[i];
			if (s->sql == NULL) {
				if (free_slot < 0)
					free_slot = i;
				continue;
			}
			if (s->len == bs->sql_len && memcmp(s->sql, bs->sql, s->len) == 0) {
				s->last_used = b->tick;
				*own = 0;
				return s->stmt;
			}
			if (victim < 0 || s->last_used < b->cache[victim].last_used)
				victim = i;
		}
		if (free_slot >= 0)
			victim = free_slot;
	}
	rc = sqlite3_prepare_v3(db, bs->sql, (int)bs->sql_len, SQLITE_PREPARE_PERSISTENT, &stmt, &tail);
	if (rc != SQLITE_OK) {
		batch_fail(j, db, rc, index, NULL);
		return NULL;
	}
	if (stmt != NULL && tail != NULL && tail < bs->sql + bs->sql_len) {
		sqlite3_stmt *extra = NULL;
		rc = sqlite3_prepare_v2(db, tail, (int)(bs->sql + bs->sql_len - tail), &extra, NULL);
		sqlite3_finalize(extra);
		if (rc != SQLITE_OK || extra != NULL) {
			sqlite3_finalize(stmt);
			stmt = NULL;
			j->misuse = 1;
			batch_fail(j, db, SQLITE_MISUSE, index, "each entry of a batch is one statement");
			return NULL;
		}
	}
	if (stmt == NULL) {
		j->misuse = 1;
		batch_fail(j, db, SQLITE_MISUSE, index, "the SQL holds no statement");
		return NULL;
	}
	if (d != NULL && victim >= 0) {
		cache_slot *c = &d->cache[victim];
		char *copy = malloc(bs->sql_len + 1);
		if (copy != NULL) {
			if (c->sql != NULL)
				slot_clear(c);
			memcpy(copy, bs->sql, bs->sql_len);
			copy[bs->sql_len] = '\0';
			c->sql = copy;
			c->len = bs->sql_len;
			c->stmt = stmt;
			c->in_use = 1;
			c->last_used = d->tick;
			*own = 0;
			*slot = victim;
		}
	} else if (b != NULL && victim >= 0) {
		batch_slot *s = &b->cache[victim];
		char *copy = malloc(bs->sql_len + 1);
		if (copy != NULL) {
			sqlite3_finalize(s->stmt);
			free(s->sql);
			memcpy(copy, bs->sql, bs->sql_len);
			copy[bs->sql_len] = '\0';
			s->sql = copy;
			s->len = bs->sql_len;
			s->stmt = stmt;
			s->last_used = b->tick;
			*own = 0;
		}
	}
	return stmt;
}

/* Keeps the current row of stmt in bs; 0, or SQLITE_NOMEM. */
static int batch_keep_row(batch_stmt *bs, sqlite3_stmt *stmt)
{
	if (bs->nrows == bs->cap) {
		size_t cap = bs->cap ? bs->cap * 2 : 4;
		batch_value *cells = realloc(bs->cells, cap * (size_t)bs->ncols * sizeof *cells);
		if (cells == NULL)
			return SQLITE_NOMEM;
		bs->cells = cells;
		bs->cap = cap;
	}
	batch_value *row = bs->cells + bs->nrows * (size_t)bs->ncols;
	memset(row, 0, (size_t)bs->ncols * sizeof *row);
	bs->nrows++;
	for (int c = 0; c < bs->ncols; c++) {
		batch_value *v = &row[c];
		v->type = sqlite3_column_type(stmt, c);
		if (v->type == SQLITE_INTEGER) {
			v->i = sqlite3_column_int64(stmt, c);
		} else if (v->type == SQLITE_FLOAT) {
			v->d = sqlite3_column_double(stmt, c);
		} else if (v->type == SQLITE_TEXT || v->type == SQLITE_BLOB) {
			const void *p = v->type == SQLITE_TEXT ? (const void *)sqlite3_column_text(stmt, c)
							       : sqlite3_column_blob(stmt, c);
			char *copy;
			v->n = (size_t)sqlite3_column_bytes(stmt, c);
			copy = malloc(v->n + 1);
			if (copy == NULL) {
				v->type = SQLITE_NULL;
				return SQLITE_NOMEM;
			}
			if (v->n > 0)
				memcpy(copy, p, v->n);
			copy[v->n] = '\0';
			v->s = copy;
		}
	}
	return SQLITE_OK;
}

/* Runs the job's statements on the batch connection b, or on the db's own d, in order,
 * stopping at the first failure (j->rc). */
static void batch_run(batch_job *j, batch_conn *b, store_db *d)
{
	sqlite3 *db = b ? b->db : d->db;
	for (int i = 0; i < j->nstmts; i++) {
		batch_stmt *bs = &j->stmts[i];
		int own, slot, rc = SQLITE_OK, nparams;
		sqlite3_int64 before = sqlite3_total_changes64(db);
		sqlite3_stmt *stmt = batch_prepare(j, db, b, d, bs, i + 1, &own, &slot);
		if (stmt == NULL)
			return;
		nparams = sqlite3_bind_parameter_count(stmt);
		if (nparams != bs->nargs) {
			char msg[96];
			snprintf(msg, sizeof msg, "the statement has %d parameter(s) but %d value(s) were given", nparams, bs->nargs);
			j->misuse = 1;
			batch_fail(j, db, SQLITE_MISUSE, i + 1, msg);
			rc = SQLITE_MISUSE;
		}
		for (int p = 0; rc == SQLITE_OK && p < bs->nargs; p++) {
			batch_value *v = &bs->args[p];
			switch (v->type) {
			case SQLITE_INTEGER: rc = sqlite3_bind_int64(stmt, p + 1, v->i); break;
			case SQLITE_FLOAT: rc = sqlite3_bind_double(stmt, p + 1, v->d); break;
			case SQLITE_TEXT: rc = sqlite3_bind_text64(stmt, p + 1, v->s, v->n, SQLITE_STATIC, SQLITE_UTF8); break;
			default: rc = sqlite3_bind_null(stmt, p + 1); break;
			}
			if (rc != SQLITE_OK)
				batch_fail(j, db, rc, i + 1, NULL);
		}
		if (rc == SQLITE_OK) {
			bs->ncols = sqlite3_column_count(stmt);
			if (bs->ncols > 0) {
				bs->names = calloc((size_t)bs->ncols, sizeof *bs->names);
				for (int c = 0; bs->names != NULL && c < bs->ncols; c++) {
					const char *name = sqlite3_column_name(stmt, c);
					bs->names[c] = name ? strdup(name) : NULL;
					if (bs->names[c] == NULL)
						rc = SQLITE_NOMEM;
				}
				if (bs->names == NULL)
					rc = SQLITE_NOMEM;
			}
			while (rc == SQLITE_OK && (rc = sqlite3_step(stmt)) == SQLITE_ROW)
				rc = bs->ncols > 0 ? batch_keep_row(bs, stmt) : SQLITE_OK;
			if (rc == SQLITE_DONE) {
				rc = SQLITE_OK;
				bs->changes = sqlite3_total_changes64(db) == before ? 0 : sqlite3_changes64(db);
				bs->rowid = sqlite3_last_insert_rowid(db);
			} else {
				batch_fail(j, db, rc, i + 1, rc == SQLITE_NOMEM ? "out of memory" : NULL);
			}
		}
		if (own) {
			sqlite3_finalize(stmt);
		} else if (slot >= 0) {
			release_stmt(d, stmt, slot);
		} else {
			sqlite3_reset(stmt);
			sqlite3_clear_bindings(stmt);
		}
		if (rc != SQLITE_OK)
			return;
	}
}

/* Fails every batch of jobs[0..n) that has not failed yet: the group's transaction is gone. */
static void batch_fail_rest(batch_job **jobs, int n, sqlite3 *db, int rc, const char *what)
{
	for (int i = 0; i < n; i++)
		if (jobs[i]->rc == SQLITE_OK)
			batch_fail(jobs[i], db, rc, 0, what);
}

/* On the batch thread: jobs[0..n) in one transaction, each in a savepoint of its own when
 * there are several (a batch that fails is rolled back alone; the others commit). */
static void batch_group_run(batch_conn *b, batch_job **jobs, int n)
{
	int rc, grouped = n > 1, committed = 0, durable = 0;
	if (b->db == NULL && (rc = batch_conn_open(b)) != SQLITE_OK) {
		batch_fail_rest(jobs, n, b->db, rc, NULL);
		sqlite3_close_v2(b->db);
		b->db = NULL;
		return;
	}
	if ((rc = batch_control(b, BATCH_BEGIN)) != SQLITE_OK) {
		batch_fail_rest(jobs, n, b->db, rc, NULL);
		return;
	}
	for (int i = 0; i < n; i++) {
		batch_job *j = jobs[i];
		if (grouped && (rc = batch_control(b, BATCH_SAVEPOINT)) != SQLITE_OK) {
			batch_fail(j, b->db, rc, 0, NULL);
			break;
		}
		batch_run(j, b, NULL);
		if (sqlite3_get_autocommit(b->db)) {
			/* SQLite rolled the whole transaction back (SQLITE_FULL, SQLITE_IOERR...) */
			char what[440];
			int code = j->rc != SQLITE_OK ? j->rc : SQLITE_MISUSE;
			if (j->rc == SQLITE_OK)
				batch_fail(j, b->db, code, 0,
					   "the batch's transaction ended inside it (a COMMIT or ROLLBACK among its statements?)");
			snprintf(what, sizeof what, "not committed: the transaction it shared with another batch ended with it: %.360s",
				 j->err);
			batch_fail_rest(jobs, n, b->db, code, what);
			return;
		}
		if (grouped && j->rc != SQLITE_OK && (rc = batch_control(b, BATCH_ROLLBACK_TO)) != SQLITE_OK)
			break;
		if (grouped && (rc = batch_control(b, BATCH_RELEASE)) != SQLITE_OK)
			break;
	}
	for (int i = 0; i < n; i++)
		if (jobs[i]->rc == SQLITE_OK) {
			committed = 1;
			durable |= jobs[i]->durable;
		}
	if (rc != SQLITE_OK) /* a savepoint could not be taken or let go: nothing is kept */
		batch_fail_rest(jobs, n, b->db, rc, NULL);
	else if (committed && (rc = batch_control(b, BATCH_COMMIT)) != SQLITE_OK)
		batch_fail_rest(jobs, n, b->db, rc, NULL);
	if (!sqlite3_get_autocommit(b->db))
		batch_control(b, BATCH_ROLLBACK);
	if (rc != SQLITE_OK || !committed)
		return;
	if (durable && b->sync_normal && b->wal == NULL) {
		sqlite3_file *wal = NULL;
		if (sqlite3_file_control(b->db, "main", SQLITE_FCNTL_JOURNAL_POINTER, &wal) == SQLITE_OK && wal != NULL &&
		    wal->pMethods != NULL) {
			uv_mutex_lock(&b->lock);
			b->wal = wal;
			uv_mutex_unlock(&b->lock);
		}
		/* else no WAL (another journal mode): its commits were synced as they happened */
	}
	for (int i = 0; i < n; i++)
		if (jobs[i]->rc == SQLITE_OK)
			jobs[i]->frames = b->wal_frames;
}

#define BATCH_GROUP_MAX 64

static void batch_flush_waiting(batch_conn *b);

static void batch_append(batch_job **head, batch_job **tail, batch_job *j)
{
	j->next = NULL;
	if (*tail)
		(*tail)->next = j;
	else
		*head = j;
	*tail = j;
}

/* The batch thread: runs what the loop queued, as groups, until told to stop. */
static void batch_thread_main(void *arg)
{
	batch_conn *b = arg;
	batch_job *group[BATCH_GROUP_MAX];
	uv_mutex_lock(&b->lock);
	for (;;) {
		int n = 0, flush = 0, done = 0;
		uint64_t t;
		while (b->queue == NULL && !b->stop)
			uv_cond_wait(&b->wake, &b->lock);
		if (b->queue == NULL)
			break;
		while (b->queue != NULL && n < BATCH_GROUP_MAX) {
			group[n++] = b->queue;
			b->queue = b->queue->next;
		}
		if (b->queue == NULL)
			b->queue_tail = NULL;
		uv_mutex_unlock(&b->lock);
		t = uv_hrtime();
		for (int i = 0; i < n; i++)
			group[i]->t_taken = t;
		batch_group_run(b, group, n);
		t = uv_hrtime();
		for (int i = 0; i < n; i++)
			group[i]->t_committed = group[i]->t_flushed = t;
		uv_mutex_lock(&b->lock);
		for (int i = 0; i < n; i++) {
			batch_job *j = group[i];
			if (j->rc == SQLITE_OK && j->durable && b->sync_normal && b->wal != NULL) {
				batch_append(&b->flush, &b->flush_tail, j);
				flush = 1;
			} else {
				batch_append(&b->done, &b->done_tail, j);
				done = 1;
			}
		}
		if (done)
			uv_async_send(&b->async);
		/* nothing else waits for this thread, and the flusher is idle: no need to wake it */
		if (flush && b->queue == NULL && !b->flushing)
			batch_flush_waiting(b);
		else if (flush)
			uv_cond_signal(&b->flush_wake);
	}
	uv_mutex_unlock(&b->lock);
}

/* Under b->lock (let go meanwhile): syncs the WAL for the durable batches committed, as
 * synchronous=FULL would have in their commit (through SQLite's own handle of the WAL: its
 * xSync is an fdatasync, safe beside the other thread's writes to the file; never two at
 * once, by `flushing`), then hands them back. */
static void batch_flush_waiting(batch_conn *b)
{
	batch_job *j = b->flush;
	sqlite3_file *wal = b->wal;
	int rc;
	uint64_t flushed;
	b->flush = b->flush_tail = NULL;
	b->flushing = 1;
	uv_mutex_unlock(&b->lock);
	rc = wal->pMethods->xSync(wal, SQLITE_SYNC_NORMAL);
	uv_mutex_lock(&b->lock);
	b->flushing = 0;
	flushed = uv_hrtime();
	while (j != NULL) {
		batch_job *next = j->next;
		j->t_flushed = flushed;
		if (rc != SQLITE_OK)
			batch_fail(j, NULL, rc, 0, "committed, but could not be flushed to disk");
		batch_append(&b->done, &b->done_tail, j);
		j = next;
	}
	uv_async_send(&b->async);
}

/* The flusher: flushes the batches the batch thread committed while it had more to run. */
static void batch_flusher_main(void *arg)
{
	batch_conn *b = arg;
	uv_mutex_lock(&b->lock);
	for (;;) {
		while (b->flush == NULL && !b->stop)
			uv_cond_wait(&b->flush_wake, &b->lock);
		if (b->flush == NULL)
			break;
		batch_flush_waiting(b);
	}
	uv_mutex_unlock(&b->lock);
}

static void batch_job_free(batch_job *j)
{
	for (int i = 0; i < j->nstmts; i++) {
		batch_stmt *bs = &j->stmts[i];
		for (size_t c = 0; c < bs->nrows * (size_t)bs->ncols; c++)
			free((char *)bs->cells[c].s);
		free(bs->cells);
		for (int c = 0; bs->names != NULL && c < bs->ncols; c++)
			free(bs->names[c]);
		free(bs->names);
	}
	free(j->stmts);
	free(j->values);
	free(j->arena);
	free(j);
}

static void push_batch_value(lua_State *L, const batch_value *v)
{
	switch (v->type) {
	case SQLITE_INTEGER: lua_pushinteger(L, (lua_Integer)v->i); break;
	case SQLITE_FLOAT: lua_pushnumber(L, (lua_Number)v->d); break;
	case SQLITE_TEXT:
	case SQLITE_BLOB: lua_pushlstring(L, v->s, v->n); break;
	default: lua_pushnil(L); break;
	}
}

/* Pushes the results (one per statement: its rows, or {changes =, rowid =}), or nil, err,
 * code; returns how many values. */
static int push_batch_results(lua_State *L, batch_job *j)
{
	if (j->rc != SQLITE_OK) {
		lua_checkstack(L, 3);
		lua_pushnil(L);
		lua_pushstring(L, j->err);
		lua_pushstring(L, primary_code_name(j->rc));
		return 3;
	}
	lua_checkstack(L, 6);
	lua_createtable(L, j->nstmts, 0);
	for (int i = 0; i < j->nstmts; i++) {
		batch_stmt *bs = &j->stmts[i];
		if (bs->ncols == 0) {
			lua_createtable(L, 0, 2);
			lua_pushinteger(L, (lua_Integer)bs->changes);
			lua_setfield(L, -2, "changes");
			lua_pushinteger(L, (lua_Integer)bs->rowid);
			lua_setfield(L, -2, "rowid");
		} else {
			lua_createtable(L, (int)bs->nrows, 0);
			for (size_t r = 0; r < bs->nrows; r++) {
				const batch_value *row = bs->cells + r * (size_t)bs->ncols;
				lua_createtable(L, 0, bs->ncols);
				for (int c = 0; c < bs->ncols; c++) {
					if (row[c].type == SQLITE_NULL)
						continue;
					push_batch_value(L, &row[c]);
					lua_setfield(L, -2, bs->names[c]);
				}
				lua_rawseti(L, -2, (lua_Integer)r + 1);
			}
		}
		lua_rawseti(L, -2, i + 1);
	}
	return 1;
}

static void batch_cancel(ops_wait *w)
{
	(void)w; /* the batch runs to its end; its completion then has nobody to wake */
}

/* Wakes j's task with its results, and lets j go. */
static void batch_finish(batch_job *j)
{
	lua_State *co = ops_wait_thread(&j->w);
	if (co != NULL)
		ops_wait_complete(&j->w, push_batch_results(co, j));
	luaL_unref(ops_main_state(), LUA_REGISTRYINDEX, j->db_ref);
	batch_job_free(j);
}

/* On the loop: the batches the thread is done with. */
static void batch_deliver(uv_async_t *h)
{
	batch_conn *b = h->data;
	batch_job *j;
	uint64_t now;
	uv_mutex_lock(&b->lock);
	j = b->done;
	b->done = b->done_tail = NULL;
	uv_mutex_unlock(&b->lock);
	now = uv_hrtime(); /* after every t_flushed of the list: they were set before it was taken */
	while (j != NULL) {
		batch_job *next = j->next;
		b->in_flight--;
		if (!b->orphaned && j->owner->db != NULL && j->t_taken != 0) {
			store_db *d = j->owner;
			d->batches++;
			d->batch_statements += (uint64_t)j->nstmts;
			d->batch_ns[0] += j->t_taken - j->t_start;
			d->batch_ns[1] += j->t_committed - j->t_taken;
			d->batch_ns[2] += j->t_flushed - j->t_committed;
			d->batch_ns[3] += now - j->t_flushed;
		}
		if (j->rc == SQLITE_OK && j->frames >= 0 && !b->orphaned && j->owner->db != NULL)
			j->owner->wal_frames = j->frames;
		batch_finish(j);
		j = next;
	}
	if (b->in_flight == 0) {
		if (b->orphaned)
			batch_conn_close(b);
		else
			uv_unref((uv_handle_t *)&b->async); /* an idle store does not keep the loop going */
	}
}

/* Hands j to the connection's thread (started by the first batch). */
static int batch_start(batch_job *j)
{
	batch_conn *b = j->conn;
	int rc;
	if (!b->async_ready) {
		if ((rc = uv_async_init(ops_loop(), &b->async, batch_deliver)) < 0)
			return rc;
		b->async_ready = 1;
	}
	if (!b->thread_started) {
		if ((rc = uv_thread_create(&b->thread, batch_thread_main, b)) < 0)
			return rc;
		b->thread_started = 1;
	}
	if (!b->flusher_started) {
		if ((rc = uv_thread_create(&b->flusher, batch_flusher_main, b)) < 0)
			return rc;
		b->flusher_started = 1;
	}
	j->next = NULL;
	j->t_start = uv_hrtime();
	uv_mutex_lock(&b->lock);
	if (b->queue_tail)
		b->queue_tail->next = j;
	else
		b->queue = j;
	b->queue_tail = j;
	uv_cond_signal(&b->wake);
	uv_mutex_unlock(&b->lock);
	if (b->in_flight++ == 0)
		uv_ref((uv_handle_t *)&b->async);
	return 0;
}

/* Reads the statements at index 1 into j; raises on misuse. */
static void batch_read(lua_State *L, batch_job *j)
{
	size_t arena = 0, nvalues = 0, used = 0;
	int n = (int)lua_rawlen(L, 1);
	luaL_argcheck(L, n > 0, 1, "a batch is a non-empty array of {sql, arg, ...}");
	for (int pass = 0; pass < 2; pass++) {
		size_t vi = 0;
		if (pass == 1) {
			j->stmts = calloc((size_t)n, sizeof *j->stmts);
			j->values = calloc(nvalues ? nvalues : 1, sizeof *j->values);
			j->arena = malloc(arena ? arena : 1);
			if (j->stmts == NULL || j->values == NULL || j->arena == NULL)
				luaL_error(L, "out of memory");
			j->nstmts = n;
		}
		for (int i = 1; i <= n; i++) {
			int nargs;
			size_t len;
			const char *sql;
			if (lua_rawgeti(L, 1, i) != LUA_TTABLE)
				luaL_error(L, "ops.store: batch entry %d must be a table {sql, arg, ...}, not a %s", i, luaL_typename(L, -1));
			/* raw accesses only: no metamethod may change an entry between the passes */
			lua_pushliteral(L, "n");
			if (lua_rawget(L, -2) == LUA_TNUMBER) {
				lua_Integer count = lua_tointeger(L, -1);
				if (count < 1 || count > BATCH_MAX_ARGS + 1)
					luaL_error(L, "ops.store: batch entry %d: n counts its SQL and its arguments (1 to %d)", i,
						   BATCH_MAX_ARGS + 1);
				nargs = (int)count - 1;
			} else {
				size_t count = lua_rawlen(L, -2);
				if (count > BATCH_MAX_ARGS + 1)
					luaL_error(L, "ops.store: batch entry %d: more than %d arguments", i, BATCH_MAX_ARGS);
				nargs = (int)count - 1;
			}
			lua_pop(L, 1);
			if (lua_rawgeti(L, -1, 1) != LUA_TSTRING)
				luaL_error(L, "ops.store: batch entry %d: its first value must be the SQL text", i);
			sql = lua_tolstring(L, -1, &len);
			lua_pop(L, 1);
			if (pass == 0) {
				arena += len + 1;
				nvalues += nargs > 0 ? (size_t)nargs : 0;
			} else {
				batch_stmt *bs = &j->stmts[i - 1];
				memcpy(j->arena + used, sql, len + 1);
				bs->sql = j->arena + used;
				bs->sql_len = len;
				used += len + 1;
				bs->nargs = nargs > 0 ? nargs : 0;
				bs->args = j->values + vi;
			}
			for (int a = 0; a < nargs; a++) {
				int t = lua_rawgeti(L, -1, a + 2);
				if (t != LUA_TNIL && t != LUA_TBOOLEAN && t != LUA_TNUMBER && t != LUA_TSTRING)
					luaL_error(L, "ops.store: batch entry %d: argument %d: cannot bind a %s", i, a + 1, luaL_typename(L, -1));
				if (t == LUA_TSTRING) {
					size_t vlen;
					const char *v = lua_tolstring(L, -1, &vlen);
					if (pass == 0) {
						arena += vlen + 1;
					} else {
						batch_value *bv = &j->values[vi];
						memcpy(j->arena + used, v, vlen + 1);
						bv->type = SQLITE_TEXT;
						bv->s = j->arena + used;
						bv->n = vlen;
						used += vlen + 1;
					}
				} else if (pass == 1) {
					batch_value *bv = &j->values[vi];
					if (t == LUA_TNIL) {
						bv->type = SQLITE_NULL;
					} else if (t == LUA_TBOOLEAN) {
						bv->type = SQLITE_INTEGER;
						bv->i = lua_toboolean(L, -1);
					} else if (lua_isinteger(L, -1)) {
						bv->type = SQLITE_INTEGER;
						bv->i = (sqlite3_int64)lua_tointeger(L, -1);
					} else {
						bv->type = SQLITE_FLOAT;
						bv->d = (double)lua_tonumber(L, -1);
					}
				}
				if (pass == 1)
					vi++;
				lua_pop(L, 1);
			}
			lua_pop(L, 1);
		}
	}
}

/* batch_read under lua_pcall, so that the job can be freed when it raises */
static int batch_read_guarded(lua_State *L)
{
	batch_read(L, lua_touserdata(L, lua_upvalueindex(1)));
	return 0;
}

/* core: db:_batch(stmts, here, durable) -> results | nil, err, code | false
 * stmts = {{sql, arg, ...}, ...} (an entry's n, if set, counts its SQL and arguments, for
 * nil arguments). Runs them in order, in one transaction, on libuv's thread pool through
 * a connection of the db's own, and gives one result per statement: its rows when it has
 * result columns (SELECT, RETURNING), else {changes =, rowid =}. durable: the WAL is
 * flushed to disk after the commit, as synchronous=FULL would have in it. With here, or for a database
 * in memory (false without here: the caller runs them), they run on this connection,
 * within the caller's transaction. ops.store's db:batch holds the connection's other tasks
 * off meanwhile. */
static int db_batch(lua_State *L)
{
	store_db *d = check_open_db(L, 1);
	int here = lua_toboolean(L, 3), durable = lua_toboolean(L, 4);
	const char *file = sqlite3_db_filename(d->db, "main");
	batch_job *j;
	int rc;
	luaL_checktype(L, 2, LUA_TTABLE);
	if (!here && (file == NULL || *file == '\0')) {
		lua_pushboolean(L, 0);
		return 1;
	}
	if (!here)
		ops_check_task(L, "db:batch");
	j = calloc(1, sizeof *j);
	if (j == NULL)
		return luaL_error(L, "out of memory");
	j->db_ref = LUA_NOREF;
	j->frames = -1;
	j->durable = durable;
	/* batch_read raises on misuse: under a pcall, so that the job is freed */
	lua_pushlightuserdata(L, j);
	lua_pushcclosure(L, batch_read_guarded, 1);
	lua_pushvalue(L, 2);
	if (lua_pcall(L, 1, 0, 0) != LUA_OK) {
		batch_job_free(j);
		return lua_error(L);
	}
	if (here) {
		int nret;
		batch_run(j, NULL, d);
		if (j->misuse) {
			lua_pushstring(L, j->err);
			batch_job_free(j);
			return lua_error(L);
		}
		nret = push_batch_results(L, j);
		batch_job_free(j);
		return nret;
	}
	if (d->batch == NULL && (d->batch = batch_conn_new(file, d)) == NULL) {
		batch_job_free(j);
		return luaL_error(L, "out of memory");
	}
	j->owner = d;
	j->conn = d->batch;
	j->w.cancel = batch_cancel;
	rc = batch_start(j);
	if (rc < 0) {
		batch_job_free(j);
		return push_uv_error(L, rc, "run a batch on the store");
	}
	lua_pushvalue(L, 1);
	j->db_ref = luaL_ref(L, LUA_REGISTRYINDEX);
	lua_settop(L, 1);
	return ops_wait_begin(L, &j->w, -1);
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
	{"_read", db_read},
	{"rows", db_rows},
	{"exec_script", db_exec_script},
	{"in_transaction", db_in_transaction},
	{"sync", db_sync},
	{"checkpoint", db_checkpoint},
	{"wal_frames", db_wal_frames},
	{"batch_stats", db_batch_stats},
	{"_batch", db_batch},
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
