/* cmocka tests for runtime/store.c (ops.core.store), driven through the Lua C API. */
#define _POSIX_C_SOURCE 200809L /* mkdtemp under -std=c11 */

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

int luaopen_ops_core_store(lua_State *L);

typedef struct {
	lua_State *L;
	char dir[64];
} fixture;

static int setup(void **state)
{
	fixture *f = calloc(1, sizeof(*f));
	assert_non_null(f);
	strcpy(f->dir, "/tmp/ops_store_test_XXXXXX");
	assert_non_null(mkdtemp(f->dir));
	f->L = luaL_newstate();
	luaL_openlibs(f->L);
	luaL_requiref(f->L, "ops.core.store", luaopen_ops_core_store, 0);
	lua_setglobal(f->L, "store");
	lua_pushstring(f->L, f->dir);
	lua_setglobal(f->L, "DIR");
	lua_settop(f->L, 0);
	*state = f;
	return 0;
}

static int teardown(void **state)
{
	fixture *f = *state;
	char cmd[128];
	lua_close(f->L);
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", f->dir);
	assert_int_equal(system(cmd), 0);
	free(f);
	return 0;
}

/* Runs a Lua chunk that must not raise; returns the number of results left on the stack. */
static int run(lua_State *L, const char *code)
{
	int base = lua_gettop(L);
	if (luaL_dostring(L, code) != LUA_OK)
		fail_msg("Lua raised: %s", lua_tostring(L, -1));
	return lua_gettop(L) - base;
}

static void test_open_sets_durable_pragmas(void **state)
{
	lua_State *L = ((fixture *)*state)->L;
	assert_int_equal(run(L,
		"db = assert(store.open(DIR .. '/a.db'))\n"
		"return db:query('PRAGMA journal_mode')[1].journal_mode,\n"
		"       db:query('PRAGMA synchronous')[1].synchronous,\n"
		"       db:query('PRAGMA foreign_keys')[1].foreign_keys"), 3);
	assert_string_equal(lua_tostring(L, 1), "wal");
	assert_int_equal(lua_tointeger(L, 2), 2);
	assert_int_equal(lua_tointeger(L, 3), 1);
}

static void test_exec_and_query_with_params(void **state)
{
	lua_State *L = ((fixture *)*state)->L;
	assert_int_equal(run(L,
		"db = assert(store.open(DIR .. '/a.db'))\n"
		"assert(db:exec('CREATE TABLE t (id INTEGER PRIMARY KEY, s TEXT, r REAL, n INTEGER)'))\n"
		"local changes, rowid = db:exec('INSERT INTO t (s, r, n) VALUES (?, ?, ?)', \"it's; DROP TABLE t\", 0.25, nil)\n"
		"local rows = db:query('SELECT * FROM t WHERE id = ?', rowid)\n"
		"return changes, rowid, rows[1].s, rows[1].r, rows[1].n == nil, #rows"), 6);
	assert_int_equal(lua_tointeger(L, 1), 1);
	assert_int_equal(lua_tointeger(L, 2), 1);
	assert_string_equal(lua_tostring(L, 3), "it's; DROP TABLE t");
	assert_true(lua_isnumber(L, 4) && !lua_isinteger(L, 4));
	assert_true(lua_tonumber(L, 4) == 0.25);
	assert_true(lua_toboolean(L, 5));
	assert_int_equal(lua_tointeger(L, 6), 1);
}

static void test_constraint_error_code(void **state)
{
	lua_State *L = ((fixture *)*state)->L;
	assert_int_equal(run(L,
		"db = assert(store.open(DIR .. '/a.db'))\n"
		"assert(db:exec('CREATE TABLE t (k TEXT UNIQUE NOT NULL)'))\n"
		"assert(db:exec('INSERT INTO t VALUES (?)', 'x'))\n"
		"local a, b, c = db:exec('INSERT INTO t VALUES (?)', 'x')\n"
		"local _, _, c2 = db:exec('INSERT INTO t VALUES (?)', nil)\n"
		"return a, b, c, c2"), 4);
	assert_true(lua_isnil(L, 1));
	assert_string_equal(lua_tostring(L, 2), "SQLITE_CONSTRAINT: UNIQUE constraint failed: t.k");
	assert_string_equal(lua_tostring(L, 3), "SQLITE_CONSTRAINT");
	assert_string_equal(lua_tostring(L, 4), "SQLITE_CONSTRAINT");
}

/* A statement left mid-step would keep the table locked: DROP TABLE proves it was reset. */
static void test_statements_finished_after_errors(void **state)
{
	lua_State *L = ((fixture *)*state)->L;
	assert_int_equal(run(L,
		"db = assert(store.open(DIR .. '/a.db'))\n"
		"assert(db:exec('CREATE TABLE t (k INTEGER UNIQUE)'))\n"
		"for i = 1, 3 do assert(db:exec('INSERT INTO t VALUES (?)', i)) end\n"
		"assert(db:exec('INSERT INTO t VALUES (?)', 1) == nil)\n"
		"assert(not pcall(function() for r in db:rows('SELECT k FROM t') do error('x') end end))\n"
		"for r in db:rows('SELECT k FROM t') do break end\n"
		"do local it = db:rows('SELECT k FROM t WHERE k > ?', 0); it() end\n"
		"collectgarbage(); collectgarbage()\n"
		"assert(db:exec('DROP TABLE t'))\n"
		"return db:close()"), 1);
	assert_true(lua_toboolean(L, 1));
}

static void test_step_error_in_rows_raises_with_code(void **state)
{
	lua_State *L = ((fixture *)*state)->L;
	/* abs() of the minimum integer overflows at step time, not prepare time. */
	assert_int_equal(run(L,
		"db = assert(store.open(DIR .. '/a.db'))\n"
		"local ok, err = pcall(function() for r in db:rows('SELECT abs(?) AS v', math.mininteger) do end end)\n"
		"assert(db:exec('CREATE TABLE t (x)'))\n"
		"assert(db:exec('DROP TABLE t'))\n"
		"return ok, err"), 2);
	assert_false(lua_toboolean(L, 1));
	assert_non_null(strstr(lua_tostring(L, 2), "SQLITE_ERROR: integer overflow"));
}

static void test_not_a_database(void **state)
{
	fixture *f = *state;
	lua_State *L = f->L;
	char path[128];
	FILE *fp;

	snprintf(path, sizeof(path), "%s/junk.db", f->dir);
	fp = fopen(path, "wb");
	assert_non_null(fp);
	for (int i = 0; i < 400; i++)
		fputs("definitely not an sqlite database\n", fp);
	fclose(fp);
	assert_int_equal(run(L, "return store.open(DIR .. '/junk.db')"), 3);
	assert_true(lua_isnil(L, 1));
	assert_non_null(strstr(lua_tostring(L, 2), "SQLITE_NOTADB: file is not a database"));
	assert_string_equal(lua_tostring(L, 3), "SQLITE_NOTADB");
}

static void test_cannot_open(void **state)
{
	lua_State *L = ((fixture *)*state)->L;
	assert_int_equal(run(L, "return store.open(DIR .. '/missing/dir/x.db')"), 3);
	assert_true(lua_isnil(L, 1));
	assert_string_equal(lua_tostring(L, 3), "SQLITE_CANTOPEN");
}

static void test_misuse_raises(void **state)
{
	lua_State *L = ((fixture *)*state)->L;
	run(L, "db = assert(store.open(DIR .. '/a.db'))");
	assert_int_not_equal(luaL_dostring(L, "db:exec('SELECT ?')"), LUA_OK);
	assert_non_null(strstr(lua_tostring(L, -1), "1 parameter(s) but 0 value(s)"));
	assert_int_not_equal(luaL_dostring(L, "db:exec('SELECT 1; SELECT 2')"), LUA_OK);
	assert_int_not_equal(luaL_dostring(L, "db:exec('SELECT ?', {})"), LUA_OK);
	assert_int_not_equal(luaL_dostring(L, "db:exec('   ')"), LUA_OK);
	assert_int_not_equal(luaL_dostring(L, "store.open(DIR .. '/b.db', {synchronous = 'off'})"), LUA_OK);
}

/* close() first, then the cursor is collected; and the reverse at lua_close. ASan checks both. */
static void test_close_order_with_live_cursors(void **state)
{
	lua_State *L = ((fixture *)*state)->L;
	run(L,
	    "db = assert(store.open(DIR .. '/a.db'))\n"
	    "assert(db:exec('CREATE TABLE t (x)'))\n"
	    "for i = 1, 3 do assert(db:exec('INSERT INTO t VALUES (?)', i)) end\n"
	    "it1 = db:rows('SELECT x FROM t')\n"
	    "it1()\n"
	    "assert(db:close())\n"
	    "assert(not pcall(it1))\n"
	    "it1 = nil; collectgarbage()\n"
	    "db2 = assert(store.open(DIR .. '/a.db'))\n"
	    "it2 = db2:rows('SELECT x FROM t')\n"
	    "it2()\n");
	/* db2 and it2 stay alive until teardown's lua_close. */
}

static void test_statement_cache_eviction(void **state)
{
	lua_State *L = ((fixture *)*state)->L;
	assert_int_equal(run(L,
		"db = assert(store.open(DIR .. '/a.db'))\n"
		"local total = 0\n"
		"for i = 1, 300 do total = total + db:query('SELECT ' .. (i % 130) .. ' AS v')[1].v end\n"
		"return total"), 1);
	assert_int_equal(lua_tointeger(L, 1), 17590);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_open_sets_durable_pragmas, setup, teardown),
		cmocka_unit_test_setup_teardown(test_exec_and_query_with_params, setup, teardown),
		cmocka_unit_test_setup_teardown(test_constraint_error_code, setup, teardown),
		cmocka_unit_test_setup_teardown(test_statements_finished_after_errors, setup, teardown),
		cmocka_unit_test_setup_teardown(test_step_error_in_rows_raises_with_code, setup, teardown),
		cmocka_unit_test_setup_teardown(test_not_a_database, setup, teardown),
		cmocka_unit_test_setup_teardown(test_cannot_open, setup, teardown),
		cmocka_unit_test_setup_teardown(test_misuse_raises, setup, teardown),
		cmocka_unit_test_setup_teardown(test_close_order_with_live_cursors, setup, teardown),
		cmocka_unit_test_setup_teardown(test_statement_cache_eviction, setup, teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
