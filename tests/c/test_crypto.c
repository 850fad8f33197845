/* cmocka tests for runtime/crypto.c (ops.core.crypto), driven through the Lua C API. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <string.h>

#include <cmocka.h>

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

int luaopen_ops_core_crypto(lua_State *L);

static int setup(void **state)
{
	lua_State *L = luaL_newstate();
	luaL_openlibs(L);
	luaL_requiref(L, "ops.core.crypto", luaopen_ops_core_crypto, 0);
	lua_setglobal(L, "crypto");
	*state = L;
	return 0;
}

static int teardown(void **state)
{
	lua_close((lua_State *)*state);
	return 0;
}

/* Calls crypto.<fn> with string arguments (NULL ends the list); leaves all results. */
static int call(lua_State *L, const char *fn, ...)
{
	va_list ap;
	const char *arg;
	int nargs = 0, base = lua_gettop(L);

	lua_getglobal(L, "crypto");
	lua_getfield(L, -1, fn);
	lua_remove(L, -2);
	va_start(ap, fn);
	while ((arg = va_arg(ap, const char *)) != NULL) {
		lua_pushstring(L, arg);
		nargs++;
	}
	va_end(ap);
	if (lua_pcall(L, nargs, LUA_MULTRET, 0) != LUA_OK)
		fail_msg("crypto.%s raised: %s", fn, lua_tostring(L, -1));
	return lua_gettop(L) - base;
}

static void test_sha256_known_vectors(void **state)
{
	lua_State *L = *state;
	assert_int_equal(call(L, "sha256", "", NULL), 1);
	assert_string_equal(lua_tostring(L, -1), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
	assert_int_equal(call(L, "sha256", "abc", NULL), 1);
	assert_string_equal(lua_tostring(L, -1), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
	lua_settop(L, 0);
}

static void test_sha256_raw_is_32_bytes(void **state)
{
	lua_State *L = *state;
	static const unsigned char abc_prefix[] = {0xba, 0x78, 0x16, 0xbf};
	size_t n;
	const char *raw;

	lua_getglobal(L, "crypto");
	lua_getfield(L, -1, "sha256");
	lua_pushliteral(L, "abc");
	lua_pushboolean(L, 1);
	assert_int_equal(lua_pcall(L, 2, 1, 0), LUA_OK);
	raw = lua_tolstring(L, -1, &n);
	assert_int_equal(n, 32);
	assert_memory_equal(raw, abc_prefix, sizeof(abc_prefix));
	lua_settop(L, 0);
}

static void test_hmac_github_vector(void **state)
{
	lua_State *L = *state;
	assert_int_equal(call(L, "hmac_sha256", "It's a Secret to Everybody", "Hello, World!", NULL), 1);
	assert_string_equal(lua_tostring(L, -1), "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17");
	lua_settop(L, 0);
}

static void test_equals(void **state)
{
	lua_State *L = *state;
	call(L, "equals", "secret", "secret", NULL);
	assert_true(lua_toboolean(L, -1));
	call(L, "equals", "secret", "secreT", NULL);
	assert_false(lua_toboolean(L, -1));
	call(L, "equals", "secret", "secret2", NULL);
	assert_false(lua_toboolean(L, -1));
	call(L, "equals", "", "", NULL);
	assert_true(lua_toboolean(L, -1));
	lua_settop(L, 0);
}

static void test_equals_raises_on_non_string(void **state)
{
	lua_State *L = *state;
	assert_int_not_equal(luaL_dostring(L, "return crypto.equals('a', nil)"), LUA_OK);
	lua_settop(L, 0);
}

static void test_base64_round_trips(void **state)
{
	lua_State *L = *state;
	static const char *const plain[] = {"", "f", "fo", "foo", "foob", "fooba", "foobar"};
	static const char *const enc[] = {"", "Zg==", "Zm8=", "Zm9v", "Zm9vYg==", "Zm9vYmE=", "Zm9vYmFy"};

	for (size_t i = 0; i < sizeof(plain) / sizeof(plain[0]); i++) {
		call(L, "base64_encode", plain[i], NULL);
		assert_string_equal(lua_tostring(L, -1), enc[i]);
		call(L, "base64_decode", enc[i], NULL);
		assert_string_equal(lua_tostring(L, -1), plain[i]);
		lua_settop(L, 0);
	}
	/* Binary data of every length 0..300, including NUL and 0xff bytes. */
	assert_int_equal(luaL_dostring(L,
		"for n = 0, 300 do\n"
		"  local s = crypto.random(n) .. '\\0\\255'\n"
		"  assert(crypto.base64_decode(crypto.base64_encode(s)) == s, n)\n"
		"end\n"
		"return true"), LUA_OK);
	lua_settop(L, 0);
}

static void test_base64_decode_rejects_bad_input(void **state)
{
	lua_State *L = *state;
	static const char *const bad[] = {"Zm9v!", "Z", "Zg=", "Zg===", "Zg==Zg==", "=Zg=", "Zm9v\x80"};

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		assert_int_equal(call(L, "base64_decode", bad[i], NULL), 3);
		assert_true(lua_isnil(L, -3));
		assert_non_null(strstr(lua_tostring(L, -2), "EINVAL: base64"));
		assert_string_equal(lua_tostring(L, -1), "EINVAL");
		lua_settop(L, 0);
	}
}

static void test_random_bounds(void **state)
{
	lua_State *L = *state;
	assert_int_equal(luaL_dostring(L, "return #crypto.random(32), crypto.random(16) ~= crypto.random(16)"), LUA_OK);
	assert_int_equal(lua_tointeger(L, -2), 32);
	assert_true(lua_toboolean(L, -1));
	lua_settop(L, 0);
	assert_int_not_equal(luaL_dostring(L, "return crypto.random(-1)"), LUA_OK);
	lua_settop(L, 0);
	assert_int_not_equal(luaL_dostring(L, "return crypto.random(1048577)"), LUA_OK);
	lua_settop(L, 0);
}

static void test_hex_round_trip_and_bad_input(void **state)
{
	lua_State *L = *state;
	call(L, "hex", "\x01\xab", NULL);
	assert_string_equal(lua_tostring(L, -1), "01ab");
	call(L, "unhex", "01AB", NULL);
	assert_memory_equal(lua_tostring(L, -1), "\x01\xab", 2);
	lua_settop(L, 0);
	assert_int_equal(call(L, "unhex", "0g", NULL), 3);
	assert_string_equal(lua_tostring(L, -1), "EINVAL");
	lua_settop(L, 0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_sha256_known_vectors, setup, teardown),
		cmocka_unit_test_setup_teardown(test_sha256_raw_is_32_bytes, setup, teardown),
		cmocka_unit_test_setup_teardown(test_hmac_github_vector, setup, teardown),
		cmocka_unit_test_setup_teardown(test_equals, setup, teardown),
		cmocka_unit_test_setup_teardown(test_equals_raises_on_non_string, setup, teardown),
		cmocka_unit_test_setup_teardown(test_base64_round_trips, setup, teardown),
		cmocka_unit_test_setup_teardown(test_base64_decode_rejects_bad_input, setup, teardown),
		cmocka_unit_test_setup_teardown(test_random_bounds, setup, teardown),
		cmocka_unit_test_setup_teardown(test_hex_round_trip_and_bad_input, setup, teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
