/*
 * ops.core.json_select: a JSON text parsed and checked whole by simdjson, and only the
 * parts a caller names made into Lua values.
 *
 *   select(text, spec) -> value | nil, err
 *
 * spec says what to make of a value: true makes all of it (as lua-cjson's decode would,
 * numbers as floats, null as cjson.null); a table {key = spec, ...} makes, of an object,
 * a table of only those keys that are in it (each by its own spec; the others are checked
 * and dropped); a table {["[]"] = spec} makes, of an array, the array of its elements,
 * each by that spec. A value whose type is not the one its spec expects (an object spec
 * on a string, an array spec on an object) is made whole, so the caller sees what is
 * there. A repeated key keeps its last value, as lua-cjson does.
 *
 * It answers nil and simdjson's reason for anything simdjson refuses: not JSON, text that
 * is not UTF-8, a number out of range, nesting deeper than MAX_DEPTH (lower than
 * lua-cjson's 512, so that what this accepts lua-cjson accepts too). Callers then decode
 * with lua-cjson, whose verdict (and message) is the one that counts.
 *
 * Built into the lazily loaded server module (runtime/lazy.c), so start-up loads neither
 * libsimdjson nor libstdc++. No C++ object with a destructor lives in a frame a Lua error
 * can unwind: the parser is static and the parse's own copy of the text is freed before
 * any Lua value is made.
 */
#include <lua.hpp>
#include <simdjson.h>

#include <cstring>
#include <new>

namespace {

constexpr size_t MAX_DEPTH = 500;
constexpr size_t SMALL = 64 * 1024;    /* the parser's capacity to start with */
constexpr size_t BIG = 4 * 1024 * 1024; /* past this, a smaller text shrinks it back */

simdjson::dom::parser *parser; /* made by the first select, kept for the next */

int null_ref = LUA_NOREF; /* cjson.null, from the registry */

void push_null(lua_State *L) { lua_rawgeti(L, LUA_REGISTRYINDEX, null_ref); }

/* The whole of v, as lua-cjson makes it. */
void push_whole(lua_State *L, simdjson::dom::element v)
{
	luaL_checkstack(L, 3, "json_select: nesting too deep");
	switch (v.type()) {
	case simdjson::dom::element_type::ARRAY: {
		simdjson::dom::array a = v.get_array().value_unsafe();
		lua_createtable(L, (int)a.size() < 1 << 20 ? (int)a.size() : 0, 0);
		lua_Integer i = 0;
		for (simdjson::dom::element e : a) {
			push_whole(L, e);
			lua_rawseti(L, -2, ++i);
		}
		return;
	}
	case simdjson::dom::element_type::OBJECT: {
		simdjson::dom::object o = v.get_object().value_unsafe();
		lua_createtable(L, 0, (int)o.size() < 1 << 20 ? (int)o.size() : 0);
		for (simdjson::dom::key_value_pair kv : o) {
			lua_pushlstring(L, kv.key.data(), kv.key.size());
			push_whole(L, kv.value);
			lua_rawset(L, -3); /* a repeated key: the last one stays */
		}
		return;
	}
	case simdjson::dom::element_type::STRING: {
		std::string_view s = v.get_string().value_unsafe();
		lua_pushlstring(L, s.data(), s.size());
		return;
	}
	case simdjson::dom::element_type::INT64:
		lua_pushnumber(L, (lua_Number)v.get_int64().value_unsafe());
		return;
	case simdjson::dom::element_type::UINT64:
		lua_pushnumber(L, (lua_Number)v.get_uint64().value_unsafe());
		return;
	case simdjson::dom::element_type::DOUBLE:
		lua_pushnumber(L, (lua_Number)v.get_double().value_unsafe());
		return;
	case simdjson::dom::element_type::BOOL:
		lua_pushboolean(L, v.get_bool().value_unsafe());
		return;
	case simdjson::dom::element_type::NULL_VALUE:
		push_null(L);
		return;
	}
	push_null(L); /* not reached: every type is above */
}

/* v by the spec at index spec (absolute); the recursion goes no deeper than the
 * document (MAX_DEPTH), whatever the spec (even one that holds itself). */
void push_selected(lua_State *L, simdjson::dom::element v, int spec)
{
	if (lua_type(L, spec) != LUA_TTABLE) {
		push_whole(L, v);
		return;
	}
	luaL_checkstack(L, 4, "json_select: nesting too deep");
	lua_pushliteral(L, "[]");
	int each = lua_rawget(L, spec) != LUA_TNIL; /* raw: no metamethod runs in a select */
	if (each && v.type() == simdjson::dom::element_type::ARRAY) {
		int elem = lua_gettop(L);
		simdjson::dom::array a = v.get_array().value_unsafe();
		lua_createtable(L, (int)a.size() < 1 << 20 ? (int)a.size() : 0, 0);
		lua_Integer i = 0;
		for (simdjson::dom::element e : a) {
			push_selected(L, e, elem);
			lua_rawseti(L, -2, ++i);
		}
		lua_remove(L, elem);
		return;
	}
	lua_pop(L, 1);
	if (each || v.type() != simdjson::dom::element_type::OBJECT) {
		push_whole(L, v);
		return;
	}
	simdjson::dom::object o = v.get_object().value_unsafe(); /* a copy: the result is a temporary */
	/* the result, then the spec's string keys and their specs, kept on the stack: an
	 * object's keys are compared with them, not made into Lua strings (most are dropped) */
	lua_newtable(L);
	int result = lua_gettop(L), nwanted = 0;
	lua_pushnil(L);
	while (lua_next(L, spec) != 0) { /* ... key value */
		if (lua_type(L, -2) == LUA_TSTRING) {
			nwanted++;
			luaL_checkstack(L, 3, "json_select: a spec with too many keys");
			lua_pushvalue(L, -2); /* keeps key and value; iterates on from the copy */
		} else {
			lua_pop(L, 1);
		}
	}
	for (simdjson::dom::key_value_pair kv : o) {
		for (int i = 0; i < nwanted; i++) {
			int key = result + 1 + 2 * i;
			size_t n;
			const char *want = lua_tolstring(L, key, &n);
			if (n == kv.key.size() && memcmp(want, kv.key.data(), n) == 0) {
				lua_pushvalue(L, key);
				push_selected(L, kv.value, key + 1);
				lua_rawset(L, result); /* a repeated key: the last one stays */
				break;
			}
		}
	}
	lua_settop(L, result);
}

/* select's values, made under a pcall (so that `busy` is cleared whatever happens) */
struct select_job {
	simdjson::dom::element root;
};

int push_job(lua_State *L)
{
	select_job *job = (select_job *)lua_touserdata(L, 1);
	push_selected(L, job->root, 2);
	return 1;
}

bool busy; /* a select is making values: the parser's document is in use */

/* select(text, spec) -> value | nil, err */
int l_select(lua_State *L)
{
	size_t len;
	const char *text = luaL_checklstring(L, 1, &len);
	luaL_argexpected(L, lua_type(L, 2) == LUA_TTABLE || lua_isboolean(L, 2), 2, "table or boolean");
	if (busy) { /* called again while values are made (a finalizer run by an allocation) */
		lua_pushnil(L);
		lua_pushliteral(L, "json_select: a select is already running");
		return 2;
	}
	if (parser == NULL) {
		parser = new (std::nothrow) simdjson::dom::parser();
		/* the depth is kept when the parser grows for a longer text */
		if (parser == NULL || parser->allocate(SMALL, MAX_DEPTH) != simdjson::SUCCESS) {
			delete parser;
			parser = NULL;
			return luaL_error(L, "json_select: out of memory");
		}
	} else if (parser->capacity() > BIG && len <= BIG) {
		/* a large body grew it (its buffers are several times the text): give that back */
		if (parser->allocate(SMALL, MAX_DEPTH) != simdjson::SUCCESS)
			return luaL_error(L, "json_select: out of memory");
	}
	select_job job;
	/* realloc_if_needed: the text is copied into a padded buffer, freed before it returns */
	simdjson::error_code err = parser->parse(text, len, true).get(job.root);
	if (err != simdjson::SUCCESS) {
		lua_pushnil(L);
		lua_pushstring(L, simdjson::error_message(err));
		return 2;
	}
	busy = true;
	lua_pushcfunction(L, push_job);
	lua_pushlightuserdata(L, &job);
	lua_pushvalue(L, 2);
	int rc = lua_pcall(L, 2, 1, 0);
	busy = false;
	if (rc != LUA_OK)
		return lua_error(L);
	return 1;
}

} // namespace

extern "C" __attribute__((visibility("default"))) int luaopen_ops_core_json_select(lua_State *L)
{
	if (null_ref == LUA_NOREF) {
		/* the same null as ops.json's and ops.yaml's */
		lua_getglobal(L, "require");
		lua_pushliteral(L, "cjson");
		lua_call(L, 1, 1);
		lua_getfield(L, -1, "null");
		null_ref = luaL_ref(L, LUA_REGISTRYINDEX);
		lua_pop(L, 1);
	}
	lua_createtable(L, 0, 2);
	lua_pushcfunction(L, l_select);
	lua_setfield(L, -2, "select");
	lua_pushinteger(L, (lua_Integer)MAX_DEPTH);
	lua_setfield(L, -2, "MAX_DEPTH");
	return 1;
}
