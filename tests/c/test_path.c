/* cmocka tests for runtime/path.c: lexical path logic and the within check. */
#define _GNU_SOURCE

#include <errno.h>
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "path.h"

static void check_normalize(const char *in, const char *want)
{
	size_t len = strlen(in);
	char *out = malloc(len + 2);
	char *inplace = malloc(len + 2);

	assert_non_null(out);
	assert_non_null(inplace);
	assert_int_equal(ops_path_normalize(in, len, out), strlen(want));
	assert_string_equal(out, want);
	memcpy(inplace, in, len + 1);
	ops_path_normalize(inplace, len, inplace);
	assert_string_equal(inplace, want);
	free(out);
	free(inplace);
}

static void normalize_collapses_slashes_and_dots(void **state)
{
	(void)state;
	check_normalize("a//b", "a/b");
	check_normalize("a/./b/.", "a/b");
	check_normalize("./a", "a");
	check_normalize("///a///", "/a");
	check_normalize("a/b/", "a/b");
}

static void normalize_cancels_dotdot_lexically(void **state)
{
	(void)state;
	check_normalize("a/b/../c", "a/c");
	check_normalize("a/..", ".");
	check_normalize("a/../..", "..");
	check_normalize("../a/../../b", "../../b");
	check_normalize("/a/../..", "/");
	check_normalize("/..", "/");
	check_normalize("/../a", "/a");
	check_normalize("..", "..");
	check_normalize("../..", "../..");
}

static void normalize_keeps_names_that_only_look_like_dots(void **state)
{
	(void)state;
	check_normalize("...", "...");
	check_normalize("a/..b/.c", "a/..b/.c");
	check_normalize("a/b../c", "a/b../c");
}

static void normalize_empty_and_root(void **state)
{
	(void)state;
	check_normalize("", ".");
	check_normalize(".", ".");
	check_normalize("./", ".");
	check_normalize("/", "/");
	check_normalize("//", "/");
}

static void normalize_reads_only_len_bytes(void **state)
{
	char out[16];

	(void)state;
	assert_int_equal(ops_path_normalize("a/b/../zzz", 5, out), 3);
	assert_string_equal(out, "a/b");
}

static void check_join(const char *const *parts, size_t n, const char *want)
{
	char out[256];

	assert_int_equal(ops_path_join(parts, n, out, sizeof out), strlen(want));
	assert_string_equal(out, want);
}

static void join_separates_and_normalizes(void **state)
{
	(void)state;
	check_join((const char *[]){"a", "b"}, 2, "a/b");
	check_join((const char *[]){"a/", "/b/"}, 2, "a/b");
	check_join((const char *[]){"/srv", "app", "../etc"}, 3, "/srv/etc");
	check_join((const char *[]){"a"}, 1, "a");
}

static void join_does_not_reset_on_absolute_parts(void **state)
{
	(void)state;
	check_join((const char *[]){"/srv", "/etc/passwd"}, 2, "/srv/etc/passwd");
}

static void join_skips_empty_parts(void **state)
{
	(void)state;
	check_join((const char *[]){"", "a", "", "b"}, 4, "a/b");
	check_join((const char *[]){"", ""}, 2, ".");
	check_join((const char *[]){"", "/x"}, 2, "/x");
}

static void join_refuses_a_short_buffer(void **state)
{
	const char *parts[] = {"abc", "def"};
	char out[9];

	(void)state;
	/* needs 3 + 1 + 3 + 1 + 2 = 10 */
	assert_int_equal(ops_path_join(parts, 2, out, sizeof out), (size_t)-1);
	assert_int_equal(ops_path_join(parts, 2, out, 10), 7);
}

static void check_dirname(const char *in, const char *want)
{
	size_t n;
	const char *d = ops_path_dirname(in, strlen(in), &n);

	assert_int_equal(n, strlen(want));
	assert_memory_equal(d, want, n);
}

static void check_basename(const char *in, const char *want)
{
	size_t n;
	const char *b = ops_path_basename(in, strlen(in), &n);

	assert_int_equal(n, strlen(want));
	assert_memory_equal(b, want, n);
}

static void dirname_follows_dirname_1(void **state)
{
	(void)state;
	check_dirname("a/b", "a");
	check_dirname("/a/b", "/a");
	check_dirname("a/b/", "a");
	check_dirname("a//b//", "a");
	check_dirname("a", ".");
	check_dirname("/a", "/");
	check_dirname("//a", "/");
	check_dirname("/", "/");
	check_dirname("//", "/");
	check_dirname("", ".");
	check_dirname(".", ".");
	check_dirname("..", ".");
	check_dirname("a/..", "a");
}

static void basename_follows_basename_1(void **state)
{
	(void)state;
	check_basename("a/b", "b");
	check_basename("a/b/", "b");
	check_basename("a/b//", "b");
	check_basename("b", "b");
	check_basename("/b", "b");
	check_basename("/", "/");
	check_basename("///", "/");
	check_basename("", ".");
	check_basename("a/..", "..");
	check_basename(".hidden", ".hidden");
}

static void contains_needs_a_segment_boundary(void **state)
{
	(void)state;
	assert_true(ops_path_contains("/srv/app", "/srv/app"));
	assert_true(ops_path_contains("/srv/app", "/srv/app/x"));
	assert_false(ops_path_contains("/srv/app", "/srv/apple"));
	assert_false(ops_path_contains("/srv/app", "/srv"));
	assert_true(ops_path_contains("/", "/anything"));
	assert_true(ops_path_contains("/", "/"));
}

/* ---- resolve and within, on a real tree ---- */

typedef struct {
	char root[PATH_MAX]; /* realpath'd, so results can be compared */
	char outside[PATH_MAX];
	char base[PATH_MAX];
} tree;

/* snprintf into a PATH_MAX buffer; test paths are short, so overflow is a bug. */
static void fmt(char *out, const char *f, ...)
{
	va_list ap;
	int n;

	va_start(ap, f);
	n = vsnprintf(out, PATH_MAX, f, ap);
	va_end(ap);
	if (n < 0 || n >= PATH_MAX)
		abort();
}

static void mkpath(const tree *t, const char *rel, char *out)
{
	fmt(out, "%s/%s", t->root, rel);
}

static int tree_setup(void **state)
{
	tree *t = calloc(1, sizeof *t);
	char tmpl[] = "/tmp/test_path.XXXXXX", p[PATH_MAX], q[PATH_MAX];
	int fd;

	if (!t || !mkdtemp(tmpl) || !realpath(tmpl, t->base))
		return -1;
	fmt(t->root, "%s/root", t->base);
	fmt(t->outside, "%s/outside", t->base);
	if (mkdir(t->root, 0755) || mkdir(t->outside, 0755))
		return -1;
	mkpath(t, "sub", p);
	if (mkdir(p, 0755))
		return -1;
	mkpath(t, "file", p);
	fd = open(p, O_WRONLY | O_CREAT | O_EXCL, 0644);
	if (fd < 0 || close(fd) != 0)
		return -1;
	/* escape -> ../outside (relative), abs -> /etc, inner -> sub, dangling -> outside/new */
	mkpath(t, "escape", p);
	if (symlink("../outside", p))
		return -1;
	mkpath(t, "abs", p);
	if (symlink("/etc", p))
		return -1;
	mkpath(t, "sub/inner", p);
	if (symlink("..", p))
		return -1;
	mkpath(t, "dangling", p);
	fmt(q, "%s/new", t->outside);
	if (symlink(q, p))
		return -1;
	mkpath(t, "loop", p);
	if (symlink("loop", p))
		return -1;
	*state = t;
	return 0;
}

static int tree_teardown(void **state)
{
	tree *t = *state;
	char cmd[PATH_MAX + 16];

	fmt(cmd, "rm -rf '%s'", t->base);
	if (system(cmd) != 0)
		return -1;
	free(t);
	return 0;
}

static void expect_within(const tree *t, const char *path, const char *want_rel)
{
	char out[PATH_MAX], want[PATH_MAX];

	if (want_rel[0])
		mkpath(t, want_rel, want);
	else
		fmt(want, "%s", t->root);
	assert_int_equal(ops_path_within(t->root, path, out, sizeof out), 0);
	assert_string_equal(out, want);
}

static void expect_outside(const tree *t, const char *path)
{
	char out[PATH_MAX];

	assert_int_equal(ops_path_within(t->root, path, out, sizeof out), OPS_PATH_EOUTSIDE);
}

static void within_accepts_relative_paths_inside(void **state)
{
	tree *t = *state;

	expect_within(t, "file", "file");
	expect_within(t, "sub/../file", "file");
	expect_within(t, "./sub/", "sub");
	expect_within(t, "", "");
	expect_within(t, ".", "");
}

static void within_accepts_paths_that_do_not_exist_yet(void **state)
{
	tree *t = *state;

	expect_within(t, "new/deeper/file", "new/deeper/file");
	expect_within(t, "new/../sub/x", "sub/x");
}

static void within_refuses_dotdot_escapes(void **state)
{
	tree *t = *state;

	expect_outside(t, "..");
	expect_outside(t, "../outside");
	expect_outside(t, "sub/../../outside/x");
	expect_outside(t, "new/../../x");
}

static void within_checks_absolute_paths(void **state)
{
	tree *t = *state;
	char p[PATH_MAX];

	mkpath(t, "sub/x", p);
	expect_within(t, p, "sub/x");
	expect_outside(t, "/etc/passwd");
	expect_outside(t, t->outside);
	expect_outside(t, "/");
	/* a sibling that shares the root's name as a prefix */
	fmt(p, "%sx", t->root);
	expect_outside(t, p);
}

static void within_refuses_symlink_escapes(void **state)
{
	tree *t = *state;

	expect_outside(t, "escape");
	expect_outside(t, "escape/new-file");
	expect_outside(t, "abs/passwd");
	expect_outside(t, "dangling");
	expect_outside(t, "sub/inner/..");
}

static void within_follows_symlinks_that_stay_inside(void **state)
{
	tree *t = *state;

	expect_within(t, "sub/inner/file", "file");
	expect_within(t, "sub/inner/sub/inner", "");
}

static void within_applies_dotdot_after_a_symlink_like_the_kernel(void **state)
{
	tree *t = *state;

	/* sub/inner is root, so sub/inner/.. is root's parent: lexically it'd be sub. */
	expect_outside(t, "sub/inner/../file");
	/* escape is base/outside, so escape/.. is base, and base/root/file is inside. */
	expect_within(t, "escape/../root/file", "file");
}

static void within_accepts_the_root_itself(void **state)
{
	tree *t = *state;
	char out[PATH_MAX], slashed[PATH_MAX];

	assert_int_equal(ops_path_within(t->root, t->root, out, sizeof out), 0);
	assert_string_equal(out, t->root);
	fmt(slashed, "%s/", t->root);
	assert_int_equal(ops_path_within(slashed, "", out, sizeof out), 0);
	assert_string_equal(out, t->root);
	assert_int_equal(ops_path_within("/", "/etc", out, sizeof out), 0);
	assert_string_equal(out, "/etc");
}

static void within_reports_errors_with_errno(void **state)
{
	tree *t = *state;
	char out[PATH_MAX], p[PATH_MAX];

	assert_int_equal(ops_path_within("/nonexistent-root-dir", "x", out, sizeof out), ENOENT);
	mkpath(t, "file", p);
	assert_int_equal(ops_path_within(p, "x", out, sizeof out), ENOTDIR);
	assert_int_equal(ops_path_within(t->root, "loop/x", out, sizeof out), ELOOP);
	assert_int_equal(ops_path_within("", "x", out, sizeof out), ENOENT);
}

static void resolve_rejects_relative_paths_and_small_buffers(void **state)
{
	char out[PATH_MAX], tiny[4];

	(void)state;
	assert_int_equal(ops_path_resolve("a/b", out, sizeof out), EINVAL);
	assert_int_equal(ops_path_resolve("/nonexistent-xyz/abc", tiny, sizeof tiny), ENAMETOOLONG);
	assert_int_equal(ops_path_resolve("/nonexistent-xyz/./../abc/", out, sizeof out), 0);
	assert_string_equal(out, "/abc");
}

int main(void)
{
	const struct CMUnitTest pure[] = {
		cmocka_unit_test(normalize_collapses_slashes_and_dots),
		cmocka_unit_test(normalize_cancels_dotdot_lexically),
		cmocka_unit_test(normalize_keeps_names_that_only_look_like_dots),
		cmocka_unit_test(normalize_empty_and_root),
		cmocka_unit_test(normalize_reads_only_len_bytes),
		cmocka_unit_test(join_separates_and_normalizes),
		cmocka_unit_test(join_does_not_reset_on_absolute_parts),
		cmocka_unit_test(join_skips_empty_parts),
		cmocka_unit_test(join_refuses_a_short_buffer),
		cmocka_unit_test(dirname_follows_dirname_1),
		cmocka_unit_test(basename_follows_basename_1),
		cmocka_unit_test(contains_needs_a_segment_boundary),
		cmocka_unit_test(resolve_rejects_relative_paths_and_small_buffers),
	};
	const struct CMUnitTest on_tree[] = {
		cmocka_unit_test(within_accepts_relative_paths_inside),
		cmocka_unit_test(within_accepts_paths_that_do_not_exist_yet),
		cmocka_unit_test(within_refuses_dotdot_escapes),
		cmocka_unit_test(within_checks_absolute_paths),
		cmocka_unit_test(within_refuses_symlink_escapes),
		cmocka_unit_test(within_follows_symlinks_that_stay_inside),
		cmocka_unit_test(within_applies_dotdot_after_a_symlink_like_the_kernel),
		cmocka_unit_test(within_accepts_the_root_itself),
		cmocka_unit_test(within_reports_errors_with_errno),
	};
	int failed = cmocka_run_group_tests_name("path", pure, NULL, NULL);
	failed += cmocka_run_group_tests_name("within", on_tree, tree_setup, tree_teardown);
	return failed;
}
