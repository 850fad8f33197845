-- ops.fs: files, directories and paths.
local fs = require "ops.fs"

local function octal(s) return tonumber(s, 8) end

-- Every spec gets a fresh directory, removed afterwards.
local tmp, root
local function p(rel) return root .. "/" .. rel end

local function make(rel, data, mode)
  assert(fs.write(p(rel), data or "", mode))
end

local function assert_fails(code, ok, err, got_code)
  assert.is_nil(ok)
  assert.equals(code, got_code)
  assert.is_string(err)
  assert.equals(code .. ": ", err:sub(1, #code + 2))
end

-- Names in dir other than the ones given: stray temp files and the like.
local function others(dir, ...)
  local expected = {}
  for _, n in ipairs { ... } do expected[n] = true end
  local extra = {}
  for _, n in ipairs(assert(fs.list(dir))) do
    if not expected[n] then extra[#extra + 1] = n end
  end
  return extra
end

before_each(function()
  tmp = assert(fs.tempdir("fs_spec-"))
  root = tmp.path
end)

after_each(function()
  tmp:remove()
end)

describe("fs.read", function()
  it("returns the whole content, binary-safe", function()
    local data = "a\0b\n" .. string.rep("x", 200000)
    make("f", data)
    assert.equals(data, fs.read(p("f")))
  end)

  it("returns an empty string for an empty file", function()
    make("empty")
    assert.equals("", fs.read(p("empty")))
  end)

  it("fails with ENOENT naming the path when the file is missing", function()
    local ok, err, code = fs.read(p("missing"))
    assert_fails("ENOENT", ok, err, code)
    assert.matches(p("missing"), err, 1, true)
  end)

  it("fails with EISDIR on a directory", function()
    assert_fails("EISDIR", fs.read(root))
  end)

  it("fails with ENOTDIR when a parent is a regular file", function()
    make("f")
    assert_fails("ENOTDIR", fs.read(p("f/x")))
  end)

  it("raises on a path that is not a string or contains a NUL byte", function()
    assert.has_error(function() fs.read(nil) end)
    assert.has_error(function() fs.read(42) end)
    assert.has_error(function() fs.read(p("f") .. "\0x") end)
  end)
end)

describe("fs.type", function()
  it("says what fs.stat's type says, following links unless told not to", function()
    local d = p("type")
    assert(fs.mkdir(d))
    local f = d .. "/f"
    assert(fs.write(f, "x"))
    assert(fs.symlink(f, d .. "/l"))
    assert.are.equal("file", fs.type(f))
    assert.are.equal("directory", fs.type(d))
    assert.are.equal("file", fs.type(d .. "/l"))
    assert.are.equal("link", fs.type(d .. "/l", {follow = false}))
    assert.are.equal(fs.stat(d .. "/l", {follow = false}).type, fs.type(d .. "/l", {follow = false}))
    assert.are.equal("other", fs.type("/dev/null"))
  end)

  it("fails as fs.stat does on a missing path, and raises on misuse", function()
    local d = root
    local v, err, code = fs.type(d .. "/missing")
    assert.is_nil(v)
    assert.are.equal("ENOENT", code)
    assert.matches(d .. "/missing", err, 1, true)
    assert.has_error(function() fs.type(nil) end)
    assert.has_error(function() fs.type(d, "x") end)
  end)
end)

describe("fs.write and fs.append", function()
  it("creates a file, then replaces its content", function()
    assert.is_true(fs.write(p("f"), "long content"))
    assert.is_true(fs.write(p("f"), "short"))
    assert.equals("short", fs.read(p("f")))
  end)

  it("appends, creating the file when missing", function()
    assert.is_true(fs.append(p("log"), "a\n"))
    assert.is_true(fs.append(p("log"), "b\n"))
    assert.equals("a\nb\n", fs.read(p("log")))
  end)

  it("sets an explicit mode exactly, as an integer or an octal string", function()
    fs.write(p("a"), "x", octal("600"))
    fs.write(p("b"), "x", "0751")
    assert.equals(octal("600"), fs.stat(p("a")).mode)
    assert.equals(octal("751"), fs.stat(p("b")).mode)
  end)

  it("raises on a bad mode", function()
    assert.has_error(function() fs.write(p("a"), "x", "rwx") end)
    assert.has_error(function() fs.write(p("a"), "x", 99999) end)
    assert.has_error(function() fs.write(p("a"), "x", -1) end)
  end)

  it("fails with ENOTDIR when the parent is a regular file", function()
    make("f")
    assert_fails("ENOTDIR", fs.write(p("f/child"), "x"))
    assert_fails("ENOTDIR", fs.append(p("f/child"), "x"))
  end)

  it("fails with ENOENT when the parent directory is missing", function()
    assert_fails("ENOENT", fs.write(p("no/such/dir/f"), "x"))
  end)

  it("fails with EISDIR when the path is a directory", function()
    assert_fails("EISDIR", fs.write(root, "x"))
  end)
end)

describe("fs.write_atomic", function()
  it("replaces the content and leaves no temp file behind", function()
    make("conf", "old")
    assert.is_true(fs.write_atomic(p("conf"), "new"))
    assert.equals("new", fs.read(p("conf")))
    assert.same({}, others(root, "conf"))
  end)

  it("creates a missing file", function()
    assert.is_true(fs.write_atomic(p("conf"), "x"))
    assert.equals("x", fs.read(p("conf")))
  end)

  it("keeps the mode of the file it replaces unless a mode is given", function()
    make("conf", "old", "0640")
    fs.write_atomic(p("conf"), "new")
    assert.equals(octal("640"), fs.stat(p("conf")).mode)
    fs.write_atomic(p("conf"), "newer", "0600")
    assert.equals(octal("600"), fs.stat(p("conf")).mode)
  end)

  it("leaves no temp file and the target untouched when the rename fails", function()
    assert(fs.mkdir(p("target")))
    make("target/inside", "keep")
    local ok, err, code = fs.write_atomic(p("target"), "data")
    assert.is_nil(ok)
    assert.is_string(err)
    assert.is_truthy(code == "EISDIR" or code == "ENOTEMPTY" or code == "EEXIST")
    assert.same({}, others(root, "target"))
    assert.equals("keep", fs.read(p("target/inside")))
  end)

  it("fails with ENOTDIR when the parent is a regular file, creating nothing", function()
    make("f", "content")
    assert_fails("ENOTDIR", fs.write_atomic(p("f/conf"), "x"))
    assert.equals("content", fs.read(p("f")))
    assert.same({}, others(root, "f"))
  end)

  it("works on a relative path in the current directory", function()
    -- dirname(name) is ".": the temp file goes there too.
    local name = ("fs_spec_atomic_%d_%d"):format(os.time(), math.random(1e9))
    finally(function() fs.remove(name) end)
    assert.is_true(fs.write_atomic(name, "x"))
    assert.equals("x", fs.read(name))
    assert.same({}, fs.glob("." .. name .. ".tmp-*", "."))
  end)
end)

describe("fs.exists", function()
  it("is true for files and directories, false for missing paths", function()
    make("f")
    assert.is_true(fs.exists(p("f")))
    assert.is_true(fs.exists(root))
    assert.is_false(fs.exists(p("missing")))
    assert.is_false(fs.exists(p("f/under-a-file")))
  end)

  it("follows symlinks: a dangling symlink does not exist", function()
    assert(fs.symlink(p("missing"), p("dangling")))
    assert.is_false(fs.exists(p("dangling")))
    assert.equals("link", fs.lstat(p("dangling")).type)
  end)
end)

describe("fs.stat", function()
  it("describes a file", function()
    make("f", "12345", "0640")
    local st = fs.stat(p("f"))
    assert.equals("file", st.type)
    assert.equals(5, st.size)
    assert.equals(octal("640"), st.mode)
    assert.equals(0, st.uid % 1)
    assert.equals(0, st.gid % 1)
    assert.is_true(math.abs(st.mtime - os.time()) < 5)
    assert.equals("float", math.type(st.mtime))
  end)

  it("follows symlinks unless asked not to", function()
    assert(fs.symlink(root, p("link")))
    assert.equals("directory", fs.stat(p("link")).type)
    assert.equals("link", fs.stat(p("link"), { follow = false }).type)
    assert.equals("link", fs.lstat(p("link")).type)
  end)

  it("reports other kinds of files as other", function()
    assert.equals("other", fs.stat("/dev/null").type)
  end)

  it("fails with ENOENT for a missing path", function()
    assert_fails("ENOENT", fs.stat(p("missing")))
  end)
end)

describe("fs.list", function()
  it("returns the names sorted in byte order, without . and ..", function()
    make("b")
    make("a")
    make(".hidden")
    make("B")
    assert(fs.mkdir(p("dir")))
    assert.same({ ".hidden", "B", "a", "b", "dir" }, fs.list(root))
  end)

  it("fails with ENOENT or ENOTDIR", function()
    make("f")
    assert_fails("ENOENT", fs.list(p("missing")))
    assert_fails("ENOTDIR", fs.list(p("f")))
  end)
end)

describe("fs.walk", function()
  before_each(function()
    assert(fs.mkdir_p(p("t/a/deep")))
    make("t/a/deep/f")
    make("t/a-b")
    make("t/z")
    assert(fs.mkdir(p("outside")))
    make("outside/secret")
    assert(fs.symlink("../outside", p("t/link")))
  end)

  it("lists every entry depth first, siblings in byte order, with its type", function()
    assert.same({
      { path = "a", type = "directory" },
      { path = "a/deep", type = "directory" },
      { path = "a/deep/f", type = "file" },
      { path = "a-b", type = "file" },
      { path = "link", type = "link" },
      { path = "z", type = "file" },
    }, fs.walk(p("t")))
  end)

  it("does not descend into symlinked directories", function()
    for _, e in ipairs(fs.walk(p("t"))) do
      assert.is_nil(e.path:find("secret", 1, true))
    end
  end)

  it("stops at max_depth", function()
    local paths = {}
    for _, e in ipairs(fs.walk(p("t"), { max_depth = 1 })) do paths[#paths + 1] = e.path end
    assert.same({ "a", "a-b", "link", "z" }, paths)
  end)

  it("fails with ENOENT for a missing directory and raises on bad options", function()
    assert_fails("ENOENT", fs.walk(p("missing")))
    assert.has_error(function() fs.walk(p("t"), { max_depth = 0 }) end)
    assert.has_error(function() fs.walk(p("t"), "deep") end)
  end)
end)

describe("fs.glob", function()
  before_each(function()
    make("b.yml")
    make("a.yaml")
    make("c.txt")
    make(".hidden.yml")
    assert(fs.mkdir(p("sub")))
    make("sub/d.yml")
  end)

  it("returns sorted matches of an absolute pattern", function()
    assert.same({ p("a.yaml"), p("b.yml") }, fs.glob(root .. "/*.{yml,yaml}"))
  end)

  it("matches inside dir and returns paths relative to it", function()
    assert.same({ "b.yml", "sub/d.yml" }, fs.glob("{,*/}*.yml", root))
  end)

  it("does not match dot files with *", function()
    for _, m in ipairs(fs.glob("*", root)) do
      assert.not_equals(".", m:sub(1, 1))
    end
  end)

  it("takes dir literally even when it contains pattern characters", function()
    assert(fs.mkdir(p("[x]")))
    make("[x]/f.yml")
    assert.same({ "f.yml" }, fs.glob("*.yml", p("[x]")))
  end)

  it("returns an empty array when nothing matches", function()
    assert.same({}, fs.glob("*.none", root))
    assert.same({}, fs.glob("*", p("missing")))
  end)

  it("raises on an absolute pattern with a dir", function()
    assert.has_error(function() fs.glob("/etc/*", root) end)
  end)
end)

describe("fs.mkdir", function()
  it("creates one directory, with an exact mode when given", function()
    assert.is_true(fs.mkdir(p("d"), { mode = "0750" }))
    local st = fs.stat(p("d"))
    assert.equals("directory", st.type)
    assert.equals(octal("750"), st.mode)
  end)

  it("fails with EEXIST or ENOENT without parents", function()
    assert_fails("EEXIST", fs.mkdir(root))
    assert_fails("ENOENT", fs.mkdir(p("a/b")))
  end)

  it("creates missing parents and accepts an existing directory with parents", function()
    assert.is_true(fs.mkdir(p("a/b/c"), { parents = true }))
    assert.equals("directory", fs.stat(p("a/b/c")).type)
    assert.is_true(fs.mkdir_p(p("a/b/c")))
    assert.is_true(fs.mkdir_p(p("a/b/../b2/")))
    assert.equals("directory", fs.stat(p("a/b2")).type)
  end)

  it("fails with EEXIST when a file is in the way, and ENOTDIR below a file", function()
    make("f")
    assert_fails("EEXIST", fs.mkdir_p(p("f")))
    assert_fails("ENOTDIR", fs.mkdir_p(p("f/x/y")))
  end)
end)

describe("fs.remove", function()
  it("removes a file and an empty directory", function()
    make("f")
    assert(fs.mkdir(p("d")))
    assert.is_true(fs.remove(p("f")))
    assert.is_true(fs.remove(p("d")))
    assert.same({}, fs.list(root))
  end)

  it("refuses a non-empty directory without recursive", function()
    assert(fs.mkdir(p("d")))
    make("d/f")
    assert_fails("ENOTEMPTY", fs.remove(p("d")))
    assert.is_true(fs.exists(p("d/f")))
  end)

  it("removes a whole tree with recursive", function()
    assert(fs.mkdir_p(p("d/a/b")))
    make("d/a/b/f")
    make("d/g", "x", "0400")
    assert(fs.mkdir(p("d/ro"), { mode = "0500" }))
    assert.is_true(fs.remove(p("d"), { recursive = true }))
    assert.is_false(fs.exists(p("d")))
  end)

  it("removes symlinks inside the tree without following them out", function()
    assert(fs.mkdir(p("keep")))
    make("keep/precious", "data")
    assert(fs.mkdir(p("d")))
    assert(fs.symlink(p("keep"), p("d/to-dir")))
    assert(fs.symlink(p("keep/precious"), p("d/to-file")))
    assert.is_true(fs.remove(p("d"), { recursive = true }))
    assert.is_false(fs.exists(p("d")))
    assert.equals("data", fs.read(p("keep/precious")))
  end)

  it("removes only the link when the path itself is a symlink to a directory", function()
    assert(fs.mkdir(p("keep")))
    make("keep/precious", "data")
    assert(fs.symlink(p("keep"), p("link")))
    assert.is_true(fs.remove(p("link"), { recursive = true }))
    assert.is_nil(fs.lstat(p("link")))
    assert.equals("data", fs.read(p("keep/precious")))
  end)

  it("fails with ENOENT for a missing path", function()
    assert_fails("ENOENT", fs.remove(p("missing")))
    assert_fails("ENOENT", fs.remove(p("missing"), { recursive = true }))
  end)
end)

describe("fs.copy", function()
  it("copies content and mode", function()
    make("src", "payload", "0751")
    assert.is_true(fs.copy(p("src"), p("dst")))
    assert.equals("payload", fs.read(p("dst")))
    assert.equals(octal("751"), fs.stat(p("dst")).mode)
  end)

  it("refuses to copy a file onto itself, leaving it intact", function()
    make("src", "payload")
    assert(fs.symlink(p("src"), p("alias")))
    assert_fails("EINVAL", fs.copy(p("src"), p("alias")))
    assert.equals("payload", fs.read(p("src")))
  end)

  it("fails with EISDIR for a directory source, ENOENT for a missing one", function()
    assert_fails("EISDIR", fs.copy(root, p("dst")))
    assert_fails("ENOENT", fs.copy(p("missing"), p("dst")))
  end)

  it("fails with ENOTDIR when the destination's parent is a file", function()
    make("src", "x")
    make("f")
    assert_fails("ENOTDIR", fs.copy(p("src"), p("f/dst")))
  end)
end)

describe("fs.copy_tree", function()
  before_each(function()
    assert(fs.mkdir_p(p("src/sub")))
    make("src/run.sh", "#!/bin/sh\n", "0755")
    make("src/sub/secret", "s", "0600")
    assert(fs.chmod(p("src/sub"), "0710"))
    assert(fs.symlink("sub/secret", p("src/rel-link")))
    assert(fs.symlink("/etc/hostname", p("src/abs-link")))
  end)

  it("copies files with their content and modes", function()
    assert.is_true(fs.copy_tree(p("src"), p("dst")))
    assert.equals("#!/bin/sh\n", fs.read(p("dst/run.sh")))
    assert.equals(octal("755"), fs.stat(p("dst/run.sh")).mode)
    assert.equals(octal("600"), fs.stat(p("dst/sub/secret")).mode)
  end)

  it("keeps directory modes, including the top directory's", function()
    assert(fs.chmod(p("src"), "0750"))
    assert.is_true(fs.copy_tree(p("src"), p("dst")))
    assert.equals(octal("710"), fs.stat(p("dst/sub")).mode)
    assert.equals(octal("750"), fs.stat(p("dst")).mode)
  end)

  it("copies symlinks as symlinks with the same target", function()
    assert.is_true(fs.copy_tree(p("src"), p("dst")))
    assert.equals("link", fs.lstat(p("dst/rel-link")).type)
    assert.equals("sub/secret", fs.readlink(p("dst/rel-link")))
    assert.equals("/etc/hostname", fs.readlink(p("dst/abs-link")))
  end)

  it("fails with EEXIST when the destination exists", function()
    assert(fs.mkdir(p("dst")))
    assert_fails("EEXIST", fs.copy_tree(p("src"), p("dst")))
  end)

  it("fails with ENOTDIR when the source is not a directory", function()
    assert_fails("ENOTDIR", fs.copy_tree(p("src/run.sh"), p("dst")))
  end)

  it("removes the partial copy when an entry cannot be copied", function()
    assert(ops.proc.run({"mkfifo", p("src/sub/fifo")}).ok)
    assert_fails("EINVAL", fs.copy_tree(p("src"), p("dst")))
    assert.is_false(fs.exists(p("dst")))
  end)
end)

describe("fs.tempdir", function()
  it("creates a private directory named after the prefix", function()
    local d = assert(fs.tempdir("myprefix-"))
    local st = fs.stat(d.path)
    assert.equals("directory", st.type)
    assert.equals(octal("700"), st.mode)
    assert.matches("/myprefix%-[^/]+$", d.path)
    d:remove()
  end)

  it("is removed with its contents at the end of a <close> block", function()
    local path
    do
      local d <close> = assert(fs.tempdir())
      path = d.path
      assert(fs.mkdir(d.path .. "/sub"))
      assert(fs.write(d.path .. "/sub/f", "x"))
    end
    assert.is_false(fs.exists(path))
  end)

  it("is removed by <close> when an error is raised inside the block", function()
    local path
    local ok, err = pcall(function()
      local d <close> = assert(fs.tempdir())
      path = d.path
      assert(fs.write(d.path .. "/f", "x"))
      error("boom")
    end)
    assert.is_false(ok)
    assert.matches("boom", err)
    assert.is_false(fs.exists(path))
  end)

  it("can be removed early, and removing twice is fine", function()
    local d = assert(fs.tempdir())
    assert.is_true(d:remove())
    assert.is_false(fs.exists(d.path))
    assert.is_true(d:remove())
  end)

  it("is removed when garbage collected", function()
    local path = assert(fs.tempdir()).path
    collectgarbage()
    collectgarbage()
    assert.is_false(fs.exists(path))
  end)

  it("raises on a prefix with a slash", function()
    assert.has_error(function() fs.tempdir("../escape") end)
  end)
end)

describe("fs.tempfile", function()
  it("creates an empty private file removed by <close>", function()
    local path
    do
      local f <close> = assert(fs.tempfile())
      path = f.path
      local st = fs.stat(path)
      assert.equals("file", st.type)
      assert.equals(0, st.size)
      assert.equals(octal("600"), st.mode)
    end
    assert.is_false(fs.exists(path))
  end)
end)

describe("fs.realpath", function()
  it("resolves symlinks and dot segments", function()
    assert(fs.mkdir(p("d")))
    assert(fs.symlink("d", p("l")))
    assert.equals(fs.realpath(root) .. "/d", fs.realpath(p("l/../l/.")))
  end)

  it("fails with ENOENT for a missing path", function()
    assert_fails("ENOENT", fs.realpath(p("missing")))
  end)
end)

describe("fs.chmod and fs.is_executable", function()
  it("changes permission bits", function()
    make("f")
    assert.is_true(fs.chmod(p("f"), octal("704")))
    assert.equals(octal("704"), fs.stat(p("f")).mode)
  end)

  it("is true only for a regular file with an execute bit", function()
    make("script", "#!/bin/sh\n", "0755")
    make("plain", "x", "0644")
    assert.is_true(fs.is_executable(p("script")))
    assert.is_false(fs.is_executable(p("plain")))
    assert.is_false(fs.is_executable(root))
    assert.is_false(fs.is_executable(p("missing")))
  end)

  it("fails with ENOENT when chmod-ing a missing path", function()
    assert_fails("ENOENT", fs.chmod(p("missing"), "0644"))
  end)
end)

describe("fs.join", function()
  it("joins with one slash and normalizes", function()
    assert.equals("a/b/c", fs.join("a", "b/", "/c"))
    assert.equals("/srv/etc", fs.join("/srv/app", "../etc"))
    assert.equals("a", fs.join("a", ""))
    assert.equals(".", fs.join(""))
  end)

  it("does not let an absolute part reset the path", function()
    assert.equals("/srv/etc/passwd", fs.join("/srv", "/etc/passwd"))
  end)

  it("raises without arguments or with a non-string", function()
    assert.has_error(function() fs.join() end)
    assert.has_error(function() fs.join("a", nil) end)
  end)
end)

describe("fs.normalize", function()
  it("removes ., .. and repeated or trailing slashes lexically", function()
    assert.equals("a/c", fs.normalize("a//b/../c/."))
    assert.equals("/", fs.normalize("/../.."))
    assert.equals("../x", fs.normalize("a/../../x"))
    assert.equals(".", fs.normalize(""))
    assert.equals("/a", fs.normalize("/a/"))
  end)
end)

describe("fs.dirname and fs.basename", function()
  it("behave like dirname(1) and basename(1)", function()
    assert.equals("/a", fs.dirname("/a/b"))
    assert.equals("a", fs.dirname("a/b/"))
    assert.equals(".", fs.dirname("b"))
    assert.equals("/", fs.dirname("/"))
    assert.equals(".", fs.dirname(""))
    assert.equals("b", fs.basename("/a/b/"))
    assert.equals("/", fs.basename("/"))
    assert.equals(".", fs.basename(""))
  end)
end)

describe("fs.is_absolute", function()
  it("is true only for paths starting with a slash", function()
    assert.is_true(fs.is_absolute("/a"))
    assert.is_false(fs.is_absolute("a/b"))
    assert.is_false(fs.is_absolute(""))
  end)
end)

describe("fs.within", function()
  local real
  before_each(function()
    assert(fs.mkdir_p(p("repo/sub")))
    assert(fs.mkdir(p("elsewhere")))
    make("repo/file")
    assert(fs.symlink("../elsewhere", p("repo/escape")))
    assert(fs.symlink("/", p("repo/slash")))
    assert(fs.symlink("sub", p("repo/inner")))
    real = fs.realpath(p("repo"))
  end)

  it("resolves a relative path against the root", function()
    assert.equals(real .. "/file", fs.within(p("repo"), "file"))
    assert.equals(real .. "/sub", fs.within(p("repo"), "./sub/"))
    assert.equals(real, fs.within(p("repo"), ""))
  end)

  it("accepts a path that does not exist yet", function()
    assert.equals(real .. "/sub/new/file", fs.within(p("repo"), "sub/new/file"))
  end)

  it("refuses .. that leads out, with EOUTSIDE", function()
    assert_fails("EOUTSIDE", fs.within(p("repo"), "../elsewhere"))
    assert_fails("EOUTSIDE", fs.within(p("repo"), "sub/../../repo2"))
    assert_fails("EOUTSIDE", fs.within(p("repo"), "new/../../x"))
  end)

  it("refuses symlinks that lead out, even to files not created yet", function()
    assert_fails("EOUTSIDE", fs.within(p("repo"), "escape"))
    assert_fails("EOUTSIDE", fs.within(p("repo"), "escape/new-file"))
    assert_fails("EOUTSIDE", fs.within(p("repo"), "slash/etc/passwd"))
  end)

  it("follows symlinks that stay inside", function()
    assert.equals(real .. "/sub/x", fs.within(p("repo"), "inner/x"))
  end)

  it("checks absolute paths against the root", function()
    assert.equals(real .. "/file", fs.within(p("repo"), p("repo/file")))
    assert_fails("EOUTSIDE", fs.within(p("repo"), "/etc/passwd"))
    assert_fails("EOUTSIDE", fs.within(p("repo"), p("repo-sibling")))
  end)

  it("fails with ENOENT when the root is missing", function()
    assert_fails("ENOENT", fs.within(p("missing"), "x"))
  end)
end)

describe("fs.sync_tree", function()
  -- every entry of a tree: path -> "type mode size content-or-target" (mtime of files too)
  local function snapshot(dir)
    local out = {}
    for _, e in ipairs(assert(fs.walk(dir))) do
      local full = dir .. "/" .. e.path
      local st = assert(fs.lstat(full))
      local what
      if st.type == "link" then what = "-> " .. fs.readlink(full)
      elseif st.type == "file" then what = fs.read(full) .. " @" .. string.format("%.6f", st.mtime)
      else what = "" end
      out[e.path] = string.format("%s %o %s", st.type, st.type == "link" and 0 or st.mode, what)
    end
    return out
  end

  before_each(function()
    assert(fs.mkdir_p(p("src/sub/deeper")))
    assert(fs.mkdir_p(p("src/empty")))
    make("src/run.sh", "#!/bin/sh\n", "0755")
    make("src/sub/secret", "s", "0600")
    make("src/sub/deeper/values.yaml", "replicas: 1\n")
    make("src/big", string.rep("0123456789abcdef", 10000)) -- over one 64 KiB chunk
    assert(fs.chmod(p("src/sub"), "0710"))
    assert(fs.symlink("sub/secret", p("src/rel-link")))
    assert(fs.symlink("/etc/hostname", p("src/abs-link")))
  end)

  it("makes a copy equal to the source: content, modes, mtimes, symlinks, empty folders", function()
    local n = assert(fs.sync_tree(p("src"), p("dst")))
    assert.same(snapshot(p("src")), snapshot(p("dst")))
    assert.equals(9, n.copied) -- 3 folders, 4 files, 2 symlinks
    assert.equals(0, n.removed)
    assert.equals(0, n.same)
    assert.equals(octal("710"), fs.stat(p("dst/sub")).mode)
  end)

  it("leaves an up-to-date copy alone: no file is replaced", function()
    assert(fs.sync_tree(p("src"), p("dst")))
    local before = fs.stat(p("dst/sub/deeper/values.yaml")).ino
    local n = assert(fs.sync_tree(p("src"), p("dst")))
    assert.same({copied = 0, removed = 0, same = 6}, n)
    assert.equals(before, fs.stat(p("dst/sub/deeper/values.yaml")).ino)
    assert.same(snapshot(p("src")), snapshot(p("dst")))
  end)

  it("gives back a folder's and a file's mode and mtime when nothing else changed", function()
    assert(fs.sync_tree(p("src"), p("dst")))
    local ino = fs.stat(p("dst/sub/deeper/values.yaml")).ino
    assert(fs.chmod(p("dst/sub/deeper"), "0700"))
    assert(ops.proc.run({"touch", "-m", "-d", "@1000000", p("dst/sub/deeper/values.yaml"), p("dst/empty")}).ok)
    local n = assert(fs.sync_tree(p("src"), p("dst")))
    assert.same({copied = 0, removed = 0, same = 6}, n)
    assert.equals(ino, fs.stat(p("dst/sub/deeper/values.yaml")).ino) -- fixed in place
    assert.same(snapshot(p("src")), snapshot(p("dst")))
    for _, d in ipairs({"sub/deeper", "empty"}) do
      local s, c = fs.stat(p("src/" .. d)), fs.stat(p("dst/" .. d))
      assert.equals(s.mode, c.mode)
      assert.equals(s.mtime, c.mtime)
    end
  end)

  it("undoes what a run changed in the copy: edits, new files, modes, swapped types", function()
    assert(fs.sync_tree(p("src"), p("dst")))
    assert(fs.write(p("dst/sub/deeper/values.yaml"), "replicas: 9\n")) -- same size, other bytes
    assert(fs.write(p("dst/big"), "short"))
    assert(fs.chmod(p("dst/run.sh"), "0644"))
    assert(fs.mkdir_p(p("dst/.terraform/providers")))
    make("dst/.terraform/providers/plugin", "binary")
    make("dst/terraform.tfstate", "{}")
    assert(fs.remove(p("dst/empty")))
    make("dst/empty", "now a file")
    assert(fs.remove(p("dst/rel-link")))
    assert(fs.symlink("elsewhere", p("dst/rel-link")))
    local n = assert(fs.sync_tree(p("src"), p("dst")))
    assert.same(snapshot(p("src")), snapshot(p("dst")))
    -- written again: the two edited files, the folder made a file, the retargeted link;
    -- removed: those four, .terraform/ and terraform.tfstate; same: the rest, run.sh's mode fixed
    assert.same({copied = 4, removed = 6, same = 3}, n)
    assert.equals(octal("755"), fs.stat(p("dst/run.sh")).mode)
    assert.is_false(fs.exists(p("dst/.terraform")))
    assert.is_false(fs.exists(p("dst/terraform.tfstate")))
  end)

  it("never writes through a symlink planted in the copy", function()
    assert(fs.mkdir_p(p("outside")))
    make("outside/values.yaml", "keep me\n")
    assert(fs.sync_tree(p("src"), p("dst")))
    -- a folder of the copy swapped for a link to a folder outside, a file for a link to a file
    assert(fs.remove(p("dst/sub/deeper"), {recursive = true}))
    assert(fs.symlink(p("outside"), p("dst/sub/deeper")))
    assert(fs.remove(p("dst/run.sh")))
    assert(fs.symlink(p("outside/values.yaml"), p("dst/run.sh")))
    assert(fs.sync_tree(p("src"), p("dst")))
    assert.same(snapshot(p("src")), snapshot(p("dst")))
    assert.equals("keep me\n", fs.read(p("outside/values.yaml")))
    assert.same({"values.yaml"}, fs.list(p("outside")))
  end)

  it("brings a read-only folder in line and gives it its mode back", function()
    make("src/sub/deeper/ro-file", "one")
    assert(fs.chmod(p("src/sub/deeper"), "0555"))
    assert(fs.sync_tree(p("src"), p("dst")))
    assert.equals(octal("555"), fs.stat(p("dst/sub/deeper")).mode)
    assert(fs.chmod(p("src/sub/deeper"), "0755"))
    make("src/sub/deeper/ro-file", "two")
    assert(fs.chmod(p("src/sub/deeper"), "0555"))
    assert(fs.sync_tree(p("src"), p("dst")))
    assert.equals("two", fs.read(p("dst/sub/deeper/ro-file")))
    assert.equals(octal("555"), fs.stat(p("dst/sub/deeper")).mode)
    assert(fs.chmod(p("src/sub/deeper"), "0755")) -- for the spec's clean-up
    assert(fs.chmod(p("dst/sub/deeper"), "0755"))
  end)

  it("fails naming the entry: a missing source, a fifo, a missing parent, a symlinked destination", function()
    local ok, err, code = fs.sync_tree(p("nope"), p("dst"))
    assert_fails("ENOENT", ok, err, code)
    assert.matches(p("nope"), err, 1, true)
    assert(ops.proc.run({"mkfifo", p("src/sub/fifo")}).ok)
    ok, err, code = fs.sync_tree(p("src"), p("dst"))
    assert_fails("ENOTSUP", ok, err, code)
    assert.matches(p("src") .. "/sub/fifo", err, 1, true)
    assert.matches("fifo, socket or device", err, 1, true)
    assert_fails("ENOENT", fs.sync_tree(p("src/sub/deeper"), p("no/such/dst")))
    assert(fs.symlink(p("src"), p("linked")))
    -- a destination that is a symlink is not followed (O_NOFOLLOW with O_DIRECTORY: ENOTDIR)
    assert_fails("ENOTDIR", fs.sync_tree(p("src/sub/deeper"), p("linked")))
    assert.same({}, others(p("src/sub/deeper"), "values.yaml"))
    assert_fails("ENOTDIR", fs.sync_tree(p("src/run.sh"), p("dst2")))
  end)

  it("raises on bad arguments and outside a task", function()
    assert.has_error(function() fs.sync_tree(nil, p("dst")) end)
    assert.has_error(function() fs.sync_tree(p("src"), "a\0b") end)
    local co = coroutine.create(function() return fs.sync_tree(p("src"), p("dst")) end)
    local ok, err = coroutine.resume(co)
    assert.is_false(ok)
    assert.matches("must be called from a task", err)
  end)
end)
