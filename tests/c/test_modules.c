/* The module searcher: names to paths, the embedded table, the search order. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <lualib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "opsrun.h"

static void module_names_become_relative_paths(void **state) {
  (void)state;
  char buf[64];
  assert_int_equal(ops_module_relpath("ops.log", buf, sizeof buf), 0);
  assert_string_equal(buf, "ops/log");
  assert_int_equal(ops_module_relpath("tools.helm", buf, sizeof buf), 0);
  assert_string_equal(buf, "tools/helm");
  assert_int_equal(ops_module_relpath("single", buf, sizeof buf), 0);
  assert_string_equal(buf, "single");
}

static void unsafe_module_names_are_refused(void **state) {
  (void)state;
  char buf[16];
  assert_int_equal(ops_module_relpath("", buf, sizeof buf), -1);
  assert_int_equal(ops_module_relpath("..evil", buf, sizeof buf), -1);
  assert_int_equal(ops_module_relpath("a..b", buf, sizeof buf), -1);
  assert_int_equal(ops_module_relpath(".a", buf, sizeof buf), -1);
  assert_int_equal(ops_module_relpath("a.", buf, sizeof buf), -1);
  assert_int_equal(ops_module_relpath("a/b", buf, sizeof buf), -1);
  assert_int_equal(ops_module_relpath("/etc/passwd", buf, sizeof buf), -1);
  assert_int_equal(ops_module_relpath("a.very.long.module.name", buf, sizeof buf), -1);
}

static void embedded_table_is_sorted_and_found(void **state) {
  (void)state;
  assert_true(ops_embedded_count > 0);
  for (size_t i = 1; i < ops_embedded_count; i++)
    assert_true(strcmp(ops_embedded_modules[i - 1].name, ops_embedded_modules[i].name) < 0);
  const ops_embedded *e = ops_embedded_find("opsrun.cli");
  assert_non_null(e);
  assert_string_equal(e->chunk, "@builtin/stdlib/opsrun/cli.lua");
  assert_non_null(ops_embedded_find("ops"));
  assert_null(ops_embedded_find("no.such.module"));
  assert_null(ops_embedded_find(""));
}

static lua_State *new_state(void) {
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  ops_modules_install(L);
  luaL_dostring(L, "modules = require 'ops.core.modules'");
  return L;
}

static const char *run(lua_State *L, const char *code) {
  if (luaL_dostring(L, code) != LUA_OK) fail_msg("lua: %s", lua_tostring(L, -1));
  return lua_tostring(L, -1);
}

static void overrides_come_before_builtins_and_builtin_stays_reachable(void **state) {
  (void)state;
  char dir[] = "/tmp/opsrun-test-modules-XXXXXX";
  assert_non_null(mkdtemp(dir));
  char path[256];
  snprintf(path, sizeof path, "%s/opsrun", dir);
  mkdir(path, 0755);
  snprintf(path, sizeof path, "%s/opsrun/cli.lua", dir);
  FILE *f = fopen(path, "w");
  fputs("return {overridden = true}\n", f);
  fclose(f);

  lua_State *L = new_state();
  lua_pushstring(L, dir);
  lua_setglobal(L, "DIR");
  /* stderr note about the shadowing is expected; silence it through a reporter */
  run(L, "SEEN = {}; modules.set_reporter(function(n, p) SEEN[#SEEN+1] = n end)");
  run(L, "modules.set_override_dirs({DIR}); return tostring(require('opsrun.cli').overridden)");
  assert_string_equal(lua_tostring(L, -1), "true");
  assert_string_equal(run(L, "return SEEN[1]"), "opsrun.cli");
  assert_string_equal(run(L, "return type(modules.builtin('opsrun.cli').main)"), "function");
  assert_string_equal(run(L, "local k, w = modules.locate('opsrun.cli'); return w"), path);
  assert_string_equal(run(L, "return (modules.locate('opsrun.cli'))"), "override");
  assert_string_equal(run(L, "return (modules.locate('ops.log'))"), "builtin");
  assert_string_equal(run(L, "return tostring((modules.locate('no.such.thing')))"), "nil");
  lua_close(L);
  unlink(path);
  snprintf(path, sizeof path, "%s/opsrun", dir);
  rmdir(path);
  rmdir(dir);
}

static void a_syntax_error_in_an_override_names_the_file(void **state) {
  (void)state;
  char dir[] = "/tmp/opsrun-test-modules-XXXXXX";
  assert_non_null(mkdtemp(dir));
  char path[256];
  snprintf(path, sizeof path, "%s/broken.lua", dir);
  FILE *f = fopen(path, "w");
  fputs("return {\n", f);
  fclose(f);
  lua_State *L = new_state();
  lua_pushstring(L, dir);
  lua_setglobal(L, "DIR");
  run(L, "modules.set_override_dirs({DIR}); local ok, err = pcall(require, 'broken'); return err");
  assert_non_null(strstr(lua_tostring(L, -1), "broken.lua"));
  assert_non_null(strstr(lua_tostring(L, -1), "error loading module 'broken'"));
  lua_close(L);
  unlink(path);
  rmdir(dir);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(module_names_become_relative_paths),
      cmocka_unit_test(unsafe_module_names_are_refused),
      cmocka_unit_test(embedded_table_is_sorted_and_found),
      cmocka_unit_test(overrides_come_before_builtins_and_builtin_stays_reachable),
      cmocka_unit_test(a_syntax_error_in_an_override_names_the_file),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
