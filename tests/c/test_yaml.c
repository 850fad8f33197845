/*
 * YAML -> Lua conversion in runtime/yaml.c, checked from C so it runs under ASan/UBSan
 * without an interpreter in between.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

int luaopen_ops_core_yaml(lua_State *L);

static int setup(void **state) {
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  luaL_requiref(L, "ops.core.yaml", luaopen_ops_core_yaml, 0);
  lua_setglobal(L, "yaml");
  *state = L;
  return 0;
}

static int teardown(void **state) {
  lua_close(*state);
  return 0;
}

/* Calls yaml.<fn>(text); leaves its results on the stack and returns how many. */
static int call(lua_State *L, const char *fn, const char *text, size_t len) {
  int top = lua_gettop(L);
  lua_getglobal(L, "yaml");
  lua_getfield(L, -1, fn);
  lua_remove(L, -2);
  lua_pushlstring(L, text, len);
  assert_int_equal(lua_pcall(L, 1, LUA_MULTRET, 0), LUA_OK);
  return lua_gettop(L) - top;
}

static void load_ok(lua_State *L, const char *text) {
  int n = call(L, "load", text, strlen(text));
  if (lua_isnil(L, -n)) fail_msg("load failed: %s", lua_tostring(L, -n + 1));
  lua_pop(L, n - 1);
}

/* Loads text, expects nil, err, "EYAML"; returns nothing on the stack, err copied to buf. */
static void load_fails(lua_State *L, const char *text, size_t len, char *buf, size_t size) {
  int n = call(L, "load", text, len);
  assert_int_equal(n, 3);
  assert_true(lua_isnil(L, -3));
  assert_string_equal(lua_tostring(L, -1), "EYAML");
  snprintf(buf, size, "%s", lua_tostring(L, -2));
  lua_pop(L, 3);
}

static void field(lua_State *L, const char *key) {
  lua_getfield(L, -1, key);
}

static void test_plain_scalars_are_typed_like_pyyaml(void **state) {
  lua_State *L = *state;
  int top = lua_gettop(L);
  load_ok(L, "i: 42\nneg: -0x1F\noct: 0755\nbin: 0b101\nsep: 1_000\nsexa: 1:30\n"
             "f: 1.5\ninf: -.inf\nnan: .nan\nyes: yes\nOFF: OFF\nnul: ~\nempty:\n"
             "s: '123'\nnotfloat: 1e3\n");
  field(L, "i");
  assert_true(lua_isinteger(L, -1));
  assert_int_equal(lua_tointeger(L, -1), 42);
  lua_pop(L, 1);
  field(L, "neg");
  assert_int_equal(lua_tointeger(L, -1), -31);
  lua_pop(L, 1);
  field(L, "oct");
  assert_int_equal(lua_tointeger(L, -1), 0755);
  lua_pop(L, 1);
  field(L, "bin");
  assert_int_equal(lua_tointeger(L, -1), 5);
  lua_pop(L, 1);
  field(L, "sep");
  assert_int_equal(lua_tointeger(L, -1), 1000);
  lua_pop(L, 1);
  field(L, "sexa");
  assert_int_equal(lua_tointeger(L, -1), 90);
  lua_pop(L, 1);
  field(L, "f");
  assert_false(lua_isinteger(L, -1));
  assert_true(lua_tonumber(L, -1) == 1.5);
  lua_pop(L, 1);
  field(L, "inf");
  assert_true(lua_tonumber(L, -1) < -1e308);
  lua_pop(L, 1);
  field(L, "nan");
  assert_true(lua_tonumber(L, -1) != lua_tonumber(L, -1));
  lua_pop(L, 1);
  /* the key "yes" is itself read as the boolean true */
  lua_pushboolean(L, 1);
  lua_rawget(L, -2);
  assert_int_equal(lua_type(L, -1), LUA_TBOOLEAN);
  assert_true(lua_toboolean(L, -1));
  lua_pop(L, 1);
  lua_pushboolean(L, 0);
  lua_rawget(L, -2);
  assert_int_equal(lua_type(L, -1), LUA_TBOOLEAN);
  assert_false(lua_toboolean(L, -1));
  lua_pop(L, 1);
  field(L, "nul");
  assert_int_equal(lua_type(L, -1), LUA_TLIGHTUSERDATA);
  assert_null(lua_touserdata(L, -1));
  lua_pop(L, 1);
  field(L, "empty");
  assert_int_equal(lua_type(L, -1), LUA_TLIGHTUSERDATA);
  lua_pop(L, 1);
  field(L, "s");
  assert_int_equal(lua_type(L, -1), LUA_TSTRING);
  assert_string_equal(lua_tostring(L, -1), "123");
  lua_pop(L, 1);
  field(L, "notfloat");
  assert_int_equal(lua_type(L, -1), LUA_TSTRING);
  lua_pop(L, 2);
  assert_int_equal(lua_gettop(L), top);
}

static void test_null_is_the_lightuserdata_null_exported_as_yaml_null(void **state) {
  lua_State *L = *state;
  load_ok(L, "null");
  lua_getglobal(L, "yaml");
  field(L, "null");
  assert_true(lua_rawequal(L, -1, -3));
  assert_null(lua_touserdata(L, -1));
  lua_pop(L, 3);
}

static void test_merge_keys_fill_only_absent_keys_first_source_winning(void **state) {
  lua_State *L = *state;
  load_ok(L, "a: &a {x: 1, y: 1, z: 1}\nb: &b {y: 2, w: 2}\nm:\n  <<: [*b, *a]\n  z: 3\n");
  field(L, "m");
  field(L, "x");
  assert_int_equal(lua_tointeger(L, -1), 1);
  lua_pop(L, 1);
  field(L, "y");
  assert_int_equal(lua_tointeger(L, -1), 2);
  lua_pop(L, 1);
  field(L, "z");
  assert_int_equal(lua_tointeger(L, -1), 3);
  lua_pop(L, 1);
  field(L, "w");
  assert_int_equal(lua_tointeger(L, -1), 2);
  lua_pop(L, 3);
}

static void test_aliases_share_the_anchored_table(void **state) {
  lua_State *L = *state;
  load_ok(L, "a: &x [1, 2]\nb: *x\n");
  field(L, "a");
  lua_getfield(L, -2, "b");
  assert_true(lua_rawequal(L, -1, -2));
  assert_int_equal(lua_rawlen(L, -1), 2);
  lua_pop(L, 3);
}

static void test_load_all_returns_every_document(void **state) {
  lua_State *L = *state;
  const char *text = "a: 1\n---\n- x\n--- 3\n";
  int n = call(L, "load_all", text, strlen(text));
  assert_int_equal(n, 1);
  assert_int_equal(lua_rawlen(L, -1), 3);
  lua_rawgeti(L, -1, 3);
  assert_int_equal(lua_tointeger(L, -1), 3);
  lua_pop(L, 2);
}

static void test_errors_name_line_and_column(void **state) {
  lua_State *L = *state;
  char err[512];
  const char *text = "a: 1\nb: [1, 2\n";
  load_fails(L, text, strlen(text), err, sizeof err);
  assert_non_null(strstr(err, "<string>:3:1: did not find expected ',' or ']'"));
}

static void test_alias_bomb_fails_fast(void **state) {
  lua_State *L = *state;
  char err[512];
  static const char bomb[] =
      "a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
      "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
      "e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n"
      "g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\nh: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]\n"
      "i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]\n";
  load_fails(L, bomb, sizeof bomb - 1, err, sizeof err);
  assert_non_null(strstr(err, "aliases expand to more than 1000000 nodes"));
}

static void test_deep_nesting_fails_cleanly(void **state) {
  lua_State *L = *state;
  char err[512];
  size_t depth = 10000;
  char *text = malloc(2 * depth + 1);
  assert_non_null(text);
  memset(text, '[', depth);
  memset(text + depth, ']', depth);
  load_fails(L, text, 2 * depth, err, sizeof err);
  free(text);
  assert_non_null(strstr(err, "<string>:1:513: nesting is deeper than 512 levels"));
}

static void test_invalid_utf8_is_reported_with_its_position(void **state) {
  lua_State *L = *state;
  char err[512];
  load_fails(L, "k: v\nx: \xC3\x28\n", 10, err, sizeof err);
  assert_non_null(strstr(err, "<string>:2:5: invalid trailing UTF-8 octet (byte 0x28)"));
  assert_non_null(strstr(err, "UTF-8"));
}

static void test_errors_inside_open_collections_leave_the_stack_balanced(void **state) {
  lua_State *L = *state;
  char err[512];
  int top = lua_gettop(L);
  const char *text = "a: &a {b: [1, {c: *nope}]}\n";
  load_fails(L, text, strlen(text), err, sizeof err);
  assert_non_null(strstr(err, "undefined alias *nope"));
  assert_int_equal(lua_gettop(L), top);
}

static void test_a_large_scalar_loads_whole(void **state) {
  lua_State *L = *state;
  size_t size = 8u << 20;
  char *text = malloc(size + 3);
  assert_non_null(text);
  memcpy(text, "k: ", 3);
  memset(text + 3, 'x', size);
  call(L, "load", text, size + 3);
  free(text);
  field(L, "k");
  assert_int_equal(lua_rawlen(L, -1), size);
  lua_pop(L, 2);
}

static void test_dump_quotes_strings_that_would_read_back_as_other_types(void **state) {
  lua_State *L = *state;
  int top = lua_gettop(L);
  assert_int_equal(luaL_dostring(L, "return yaml.dump({a = 'yes', b = '123', c = '', d = 'null', e = 7})"),
                   LUA_OK);
  assert_string_equal(lua_tostring(L, -1), "a: 'yes'\nb: '123'\nc: ''\nd: 'null'\ne: 7\n");
  lua_settop(L, top);
}

/* Fails every Lua allocation once `budget` allocations have been made. */
static void *limited_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  long *budget = ud;
  if (nsize == 0) {
    free(ptr);
    return NULL;
  }
  if (ptr == NULL || nsize > osize) {
    if (*budget <= 0) return NULL;
    (*budget)--;
  }
  return realloc(ptr, nsize);
}

/* Run under ASan: a leaked parser, emitter or buffer on any of these paths is reported. */
static void test_out_of_memory_at_any_point_leaks_nothing(void **state) {
  static const char chunk[] =
      "local v = assert(yaml.load('a: &a {x: [1, 2.5, yes, ~]}\\nb:\\n  <<: *a\\n  y: \\'s\\'\\n'))\n"
      "assert(yaml.load('a: [1, *nope]') == nil)\n"
      "return yaml.dump(v)";
  int succeeded = 0;
  (void)state;
  for (long n = 0; n < 100000 && !succeeded; n += 1) {
    long budget = 1L << 30;
    lua_State *L = lua_newstate(limited_alloc, &budget);
    assert_non_null(L);
    luaL_openlibs(L);
    luaL_requiref(L, "ops.core.yaml", luaopen_ops_core_yaml, 0);
    lua_setglobal(L, "yaml");
    assert_int_equal(luaL_loadstring(L, chunk), LUA_OK);
    budget = n;
    succeeded = lua_pcall(L, 0, 1, 0) == LUA_OK;
    if (succeeded) assert_string_equal(lua_tostring(L, -1), "a:\n  x:\n  - 1\n  - 2.5\n  - true\n  - null\nb:\n  x:\n  - 1\n  - 2.5\n  - true\n  - null\n  'y': s\n");
    budget = 1L << 30;
    lua_close(L);
  }
  assert_true(succeeded);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup_teardown(test_plain_scalars_are_typed_like_pyyaml, setup, teardown),
      cmocka_unit_test_setup_teardown(test_null_is_the_lightuserdata_null_exported_as_yaml_null, setup, teardown),
      cmocka_unit_test_setup_teardown(test_merge_keys_fill_only_absent_keys_first_source_winning, setup, teardown),
      cmocka_unit_test_setup_teardown(test_aliases_share_the_anchored_table, setup, teardown),
      cmocka_unit_test_setup_teardown(test_load_all_returns_every_document, setup, teardown),
      cmocka_unit_test_setup_teardown(test_errors_name_line_and_column, setup, teardown),
      cmocka_unit_test_setup_teardown(test_alias_bomb_fails_fast, setup, teardown),
      cmocka_unit_test_setup_teardown(test_deep_nesting_fails_cleanly, setup, teardown),
      cmocka_unit_test_setup_teardown(test_invalid_utf8_is_reported_with_its_position, setup, teardown),
      cmocka_unit_test_setup_teardown(test_errors_inside_open_collections_leave_the_stack_balanced, setup, teardown),
      cmocka_unit_test_setup_teardown(test_a_large_scalar_loads_whole, setup, teardown),
      cmocka_unit_test_setup_teardown(test_dump_quotes_strings_that_would_read_back_as_other_types, setup, teardown),
      cmocka_unit_test(test_out_of_memory_at_any_point_leaks_nothing),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
