--- ops.fs: files, directories and paths.
-- The system calls are in runtime/fs.c (ops.core.fs); this file holds what is
-- policy: sorting, recursion over trees, parents for mkdir, temp objects.
-- Environmental failures return nil, "CODE: what: path", "CODE"; misuse raises.
local core = require "ops.core.fs"

local fs = {}

fs.read = core.read
fs.write = core.write
fs.append = core.append
fs.write_atomic = core.write_atomic
fs.copy = core.copy
fs.exists = core.exists
fs.is_executable = core.is_executable
fs.chmod = core.chmod
fs.realpath = core.realpath
fs.readlink = core.readlink
fs.symlink = core.symlink
fs.rename = core.rename
fs.join = core.join
fs.dirname = core.dirname
fs.basename = core.basename
fs.normalize = core.normalize
fs.is_absolute = core.is_absolute
fs.within = core.within

--- fs.sync_tree(src, dst) -> {copied, removed, same} | nil, err, code
--- Makes dst (created when missing; its parent must exist) an exact copy of the directory
--- src, as `cp -a` would: directories, regular files (content, mode bits, mtime, and owner
--- when run as root) and symlinks (their target text). Only what differs is written: a file
--- with the same bytes is left in place (its mode and mtime set), one that differs is
--- replaced, an entry src does not have is removed. Nothing in dst is followed (a symlink
--- there is an entry, not a way out). A fifo, socket or device in src fails with ENOTSUP.
--- Runs on libuv's thread pool: call it in a task.
fs.sync_tree = core.sync_tree

-- Raises "bad argument #n to 'fs.name' (msg)" at the caller of the public function.
local function argcheck(cond, n, name, msg)
  if not cond then
    error(("bad argument #%d to 'fs.%s' (%s)"):format(n, name, msg), 3)
  end
end

local function check_opts(opts, n, name)
  argcheck(opts == nil or type(opts) == "table", n, name,
    "options table expected, got " .. type(opts))
  return opts or {}
end

local function child(dir, name)
  if dir:sub(-1) == "/" then return dir .. name end
  return dir .. "/" .. name
end

--- fs.stat(path [, {follow=true}]) -> {type, size, mode, mtime, uid, gid, ino} | nil, err, code
function fs.stat(path, opts)
  argcheck(type(path) == "string", 1, "stat", "string expected, got " .. type(path))
  if opts == nil then return core.stat(path, true) end
  opts = check_opts(opts, 2, "stat")
  return core.stat(path, opts.follow ~= false)
end

--- fs.type(path [, {follow=true}]) -> fs.stat(path).type ("file", "directory", "link", ...)
--- | nil, err, code: for a test of what a path is, with no table made
function fs.type(path, opts)
  argcheck(type(path) == "string", 1, "type", "string expected, got " .. type(path))
  if opts == nil then return core.type(path, true) end
  opts = check_opts(opts, 2, "type")
  return core.type(path, opts.follow ~= false)
end

--- fs.lstat(path) -> like fs.stat(path, {follow=false})
function fs.lstat(path)
  return core.stat(path, false)
end

--- fs.list(dir) -> sorted array of names | nil, err, code
function fs.list(dir)
  argcheck(type(dir) == "string", 1, "list", "string expected, got " .. type(dir))
  local names, err, code = core.scandir(dir)
  if not names then return nil, err, code end
  table.sort(names)
  return names
end

--- fs.walk(dir [, {max_depth=n}]) -> array of {path=, type=} | nil, err, code
-- Depth first, each directory's entries in byte order, a directory before its
-- contents; symlinks are listed as "link" and never descended into.
function fs.walk(dir, opts)
  argcheck(type(dir) == "string", 1, "walk", "string expected, got " .. type(dir))
  opts = check_opts(opts, 2, "walk")
  local max_depth = opts.max_depth or math.huge
  argcheck(math.type(max_depth) == "integer" and max_depth >= 1 or max_depth == math.huge,
    2, "walk", "max_depth must be a positive integer")
  local out = {}

  local function visit(abs, rel, depth)
    local names, types, code = core.scandir(abs)
    if not names then return nil, types, code end
    table.sort(names)
    for _, name in ipairs(names) do
      local path = rel and rel .. "/" .. name or name
      local kind = types[name]
      out[#out + 1] = { path = path, type = kind }
      if kind == "directory" and depth < max_depth then
        local ok, err, c = visit(child(abs, name), path, depth + 1)
        if not ok then return nil, err, c end
      end
    end
    return true
  end

  local ok, err, code = visit(dir, nil, 1)
  if not ok then return nil, err, code end
  return out
end

--- fs.glob(pattern [, dir]) -> sorted array of paths | nil, err, code
-- With dir, the pattern is matched inside dir and the results are relative to it.
function fs.glob(pattern, dir)
  argcheck(type(pattern) == "string", 1, "glob", "string expected, got " .. type(pattern))
  local prefix = ""
  if dir ~= nil then
    argcheck(type(dir) == "string" and dir ~= "", 2, "glob", "directory must be a non-empty string")
    argcheck(pattern:sub(1, 1) ~= "/", 1, "glob", "pattern must be relative when a directory is given")
    prefix = child(dir, "")
  end
  -- dir is a literal name: escape what glob(3) would take as a pattern.
  local matches, err, code = core.glob(prefix:gsub("[%*%?%[%]{}\\]", "\\%0") .. pattern)
  if not matches then return nil, err, code end
  for i, m in ipairs(matches) do
    matches[i] = m:sub(#prefix + 1)
  end
  table.sort(matches)
  return matches
end

local function is_dir(path)
  local st = core.stat(path, true)
  return st ~= nil and st.type == "directory"
end

local function mkdir_parents(path, mode)
  local ok, err, code = core.mkdir(path, mode)
  if ok or (code == "EEXIST" and is_dir(path)) then return true end
  if code ~= "ENOENT" then return nil, err, code end
  local parent = core.dirname(path)
  if parent == path then return nil, err, code end
  local pok, perr, pcode = mkdir_parents(parent, nil)
  if not pok then return nil, perr, pcode end
  ok, err, code = core.mkdir(path, mode)
  if ok or (code == "EEXIST" and is_dir(path)) then return true end
  return nil, err, code
end

--- fs.mkdir(path [, {parents=false, mode=nil}]) -> true | nil, err, code
-- With parents, missing parents are created (mode 0777 & ~umask) and an existing
-- directory is success; mode applies, exactly, to the directory path only.
function fs.mkdir(path, opts)
  argcheck(type(path) == "string", 1, "mkdir", "string expected, got " .. type(path))
  opts = check_opts(opts, 2, "mkdir")
  if opts.parents then return mkdir_parents(path, opts.mode) end
  return core.mkdir(path, opts.mode)
end

--- fs.mkdir_p(path [, {mode=nil}]) -> fs.mkdir(path, {parents=true, mode=mode})
function fs.mkdir_p(path, opts)
  argcheck(type(path) == "string", 1, "mkdir_p", "string expected, got " .. type(path))
  opts = check_opts(opts, 2, "mkdir_p")
  return mkdir_parents(path, opts.mode)
end

--- fs.remove(path [, {recursive=false}]) -> true | nil, err, code
-- Removes a file, a symlink (never its target) or an empty directory; with
-- recursive, a directory and everything in it, without following symlinks.
function fs.remove(path, opts)
  argcheck(type(path) == "string", 1, "remove", "string expected, got " .. type(path))
  opts = check_opts(opts, 2, "remove")
  if opts.recursive then return core.remove_tree(path) end
  return core.remove(path)
end

--- fs.copy_tree(src, dst) -> true | nil, err, code
-- dst must not exist. Copies files with their modes, directories with their
-- modes, symlinks as symlinks (their target text verbatim). On failure dst is
-- removed again.
function fs.copy_tree(src, dst)
  argcheck(type(src) == "string", 1, "copy_tree", "string expected, got " .. type(src))
  argcheck(type(dst) == "string", 2, "copy_tree", "string expected, got " .. type(dst))
  local st, err, code = core.stat(src, false)
  if not st then return nil, err, code end
  if st.type ~= "directory" then
    return nil, "ENOTDIR: not a directory: " .. src, "ENOTDIR"
  end
  local entries
  entries, err, code = fs.walk(src)
  if not entries then return nil, err, code end

  -- Directories stay 0700 while being filled: a read-only source directory must
  -- not stop the copy of its contents. Their modes are applied last, deepest first.
  local ok
  ok, err, code = core.mkdir(dst, 448)
  if not ok then return nil, err, code end
  local dirs = { { path = dst, mode = st.mode } }

  local function copy_entry(e)
    local from, to = child(src, e.path), child(dst, e.path)
    if e.type == "directory" then
      local dst_st, serr, scode = core.stat(from, false)
      if not dst_st then return nil, serr, scode end
      dirs[#dirs + 1] = { path = to, mode = dst_st.mode }
      return core.mkdir(to, 448)
    elseif e.type == "file" then
      return core.copy(from, to)
    elseif e.type == "link" then
      local target, lerr, lcode = core.readlink(from)
      if not target then return nil, lerr, lcode end
      return core.symlink(target, to)
    end
    return nil, "EINVAL: cannot copy a special file: " .. from, "EINVAL"
  end

  for _, e in ipairs(entries) do
    ok, err, code = copy_entry(e)
    if not ok then break end
  end
  if ok then
    for i = #dirs, 1, -1 do
      ok, err, code = core.chmod(dirs[i].path, dirs[i].mode)
      if not ok then break end
    end
  end
  if not ok then
    core.remove_tree(dst)
    return nil, err, code
  end
  return true
end

local function temp_template(prefix, name)
  prefix = prefix or "opsrun-"
  argcheck(type(prefix) == "string" and not prefix:find("/", 1, true), 1, name,
    "prefix must be a string without '/'")
  local base = os.getenv("TMPDIR")
  if base == nil or base == "" then base = "/tmp" end
  return child(base, prefix .. "XXXXXX")
end

-- A temp path that removes itself: remove() explicitly, or on <close> / collection.
local function temp_class(kind, remover)
  local class = {}
  class.__index = class
  function class:remove()
    if self.removed then return true end
    local ok, err, code = remover(self.path)
    if ok or code == "ENOENT" then
      self.removed = true
      return true
    end
    return nil, err, code
  end
  -- Errors are dropped: __close must not replace the error that ended the block.
  class.__close = function(self) self:remove() end
  class.__gc = class.__close
  class.__tostring = function(self) return kind .. " " .. self.path end
  return class
end

local TempDir = temp_class("tempdir", core.remove_tree)
local TempFile = temp_class("tempfile", core.remove)

--- fs.tempdir([prefix]) -> {path=} with :remove(), <close> and __gc | nil, err, code
-- A new 0700 directory $TMPDIR/<prefix>XXXXXX (prefix "opsrun-", TMPDIR "/tmp").
function fs.tempdir(prefix)
  local path, err, code = core.mkdtemp(temp_template(prefix, "tempdir"))
  if not path then return nil, err, code end
  return setmetatable({ path = path, removed = false }, TempDir)
end

--- fs.tempfile([prefix]) -> {path=} with :remove(), <close> and __gc | nil, err, code
-- A new empty 0600 file, like fs.tempdir.
function fs.tempfile(prefix)
  local path, err, code = core.mkstemp(temp_template(prefix, "tempfile"))
  if not path then return nil, err, code end
  return setmetatable({ path = path, removed = false }, TempFile)
end

return fs
