-- ops.deploy.repo: an operations repository as BitOps lays it out.
--   <repo>/<env>/                 an environment (any top-level folder but _default and dot-folders)
--   <repo>/<env>/bitops.config.yaml   bitops.deployments (order, plugin per folder), fail_fast, logging
--   <repo>/<env>/<tool>/          terraform/, ansible/, helm/, cloudformation/ (or any folder a
--                                 deployment names, with a plugin)
--   <repo>/_default/<tool>/       merged into every environment's tool folder
local fs = require "ops.fs"
local yaml = require "ops.yaml"
local proc = require "ops.proc"
local sys = require "ops.sys"
local config = require "ops.deploy.config"
local failure = require "ops.deploy.failure"
local modules = require "ops.core.modules"

local repo = {}

repo.DEFAULT_ORDER = {"terraform", "ansible", "helm", "cloudformation"}
repo.DEFAULT_DIR = "_default"

local function is_dir(path)
  return fs.type(path) == "directory"
end

--- repo.environments(root) -> sorted names
function repo.environments(root)
  local names, err = fs.list(root)
  if not names then failure.raise("cannot read the operations repo: " .. err) end
  local out = {}
  for _, name in ipairs(names) do
    if name:sub(1, 1) ~= "." and name ~= repo.DEFAULT_DIR and is_dir(fs.join(root, name)) then
      out[#out + 1] = name
    end
  end
  return out
end

local USED = {deployments = true, fail_fast = true, logging = true}
-- BitOps settings opsrun has no use for, ignored without a word (docs/migrating-from-bitops.md)
local BITOPS_ONLY = {run_mode = true, default_folder = true, timeout = true, plugins = true, source = true,
  opsrepo_root_default_dir = true}

--- repo.env_config(root, env) -> the environment's bitops settings ({} when absent)
function repo.env_config(root, env)
  local shown = env .. "/bitops.config.yaml"
  local file = config.load_yaml(fs.join(root, env, "bitops.config.yaml"), shown)
  local default = config.load_yaml(fs.join(root, repo.DEFAULT_DIR, "bitops.config.yaml"),
    repo.DEFAULT_DIR .. "/bitops.config.yaml")
  local merged = config.deep_merge(default or {}, file or {})
  -- a wrong value is named with the file it came from: the environment's, else _default's
  local own = type(file) == "table" and type(file.bitops) == "table" and file.bitops or {}
  local function from(key)
    local mine = key and own[key] ~= nil or not key and type(file) == "table" and file.bitops ~= nil
    return mine and shown or repo.DEFAULT_DIR .. "/bitops.config.yaml"
  end
  local function mapping(v) return type(v) == "table" and (next(v) == nil or not config.is_sequence(v)) end
  local b = merged.bitops
  if b == yaml.null then b = nil end -- `bitops:` with nothing under it (all of it commented out)
  if b ~= nil and not mapping(b) then
    failure.raise(from() .. ": bitops must be a mapping, not " .. config.describe(b))
  end
  b = b or {}
  for _, key in ipairs({"fail_fast", "logging"}) do
    if b[key] == yaml.null then b[key] = nil end
  end
  if b.fail_fast ~= nil and type(b.fail_fast) ~= "boolean" then
    failure.raise(string.format("%s: bitops.fail_fast must be true or false, not %s", from("fail_fast"),
      config.describe(b.fail_fast)))
  end
  if b.logging ~= nil and not mapping(b.logging) then
    failure.raise(string.format("%s: bitops.logging must be a mapping (masks: ...), not %s", from("logging"),
      config.describe(b.logging)))
  end
  local unknown = {} -- misspelt, most likely
  for key in pairs(b) do
    if not USED[key] and not BITOPS_ONLY[key] then
      unknown[#unknown + 1] = string.format("%s: bitops.%s is not a setting opsrun knows (deployments, fail_fast,"
        .. " logging); ignored", from(key), tostring(key))
    end
  end
  table.sort(unknown)
  for _, msg in ipairs(unknown) do require("ops.log").warn(msg) end
  -- keep the document order of the deployments the environment's own file gave
  local order_src = own.deployments or b.deployments
  return b, order_src, shown
end

-- tools.<name> is a driver, or a command (tools.deploy, tools.runs, tools.serve: a module
-- with a main). One that cannot be loaded counts as a driver: deploy.driver says why it fails.
local function known_tool(name)
  if type(name) ~= "string" or not name:match("^[%w_%-]+$") or modules.locate("tools." .. name) == nil then
    return false
  end
  local ok, mod = pcall(require, "tools." .. name)
  return not ok or type(mod) ~= "table" or type(mod.main) ~= "function"
end

local function tool_names()
  local out = {}
  for _, name in ipairs(modules.list()) do
    local t = name:match("^tools%.([%w_]+)$")
    if t and known_tool(t) then out[#out + 1] = t end
  end
  return table.concat(out, ", ")
end

--- repo.is_tool(name) -> whether tools.<name> is a deployment driver (built in or the repo's)
repo.is_tool = known_tool
--- repo.tool_names() -> "ansible, cloudformation, ..." (the drivers opsrun can run)
repo.tool_names = tool_names

--- repo.plan_env(root, env) -> steps, settings
--- steps: {{id, env, tool, folder}} in deployment order; settings: the env's bitops table
function repo.plan_env(root, env)
  local env_dir = fs.join(root, env)
  -- an environment is a top-level folder of the repo: never a path out of it
  local is_env = type(env) == "string" and env:match("^[%w_][%w_.-]*$") and env ~= repo.DEFAULT_DIR
  if not is_env or not is_dir(env_dir) then
    local envs = repo.environments(root)
    failure.raise(string.format("environment '%s' not found in %s (environments: %s)", env, root,
      #envs > 0 and table.concat(envs, ", ") or "none"))
  end
  local settings, deployments, shown = repo.env_config(root, env)
  local steps = {}
  if deployments ~= nil then
    if type(deployments) ~= "table" or config.is_sequence(deployments) then
      failure.raise(shown .. ": bitops.deployments must be a mapping of folder: {plugin: tool}")
    end
    for _, folder in ipairs(yaml.keys(deployments)) do
      local d = deployments[folder]
      if type(folder) ~= "string" or not folder:match("^[%w_%.%-]+$") or folder == ".." or folder == "." then
        failure.raise(string.format("%s: bitops.deployments: '%s' is not a folder name", shown, tostring(folder)))
      end
      local plugin = type(d) == "table" and d.plugin or nil
      if plugin == nil and known_tool(folder) then plugin = folder end
      if plugin == nil then
        failure.raise(string.format("%s: bitops.deployments.%s needs a plugin: (one of %s)", shown, folder, tool_names()))
      end
      if not known_tool(plugin) then
        failure.raise(string.format("%s: bitops.deployments.%s.plugin: unknown plugin '%s' (known: %s)",
          shown, folder, tostring(plugin), tool_names()))
      end
      if not is_dir(fs.join(env_dir, folder)) then
        failure.raise(string.format("%s: bitops.deployments.%s: there is no folder %s/%s", shown, folder, env, folder))
      end
      steps[#steps + 1] = {id = env .. "/" .. folder, env = env, tool = plugin, folder = folder}
    end
  else
    for _, tool in ipairs(repo.DEFAULT_ORDER) do
      if is_dir(fs.join(env_dir, tool)) then
        steps[#steps + 1] = {id = env .. "/" .. tool, env = env, tool = tool, folder = tool}
      end
    end
  end
  return steps, settings
end

local MERGED = {["bitops.config.yaml"] = true, ["bitops.config.yml"] = true}
local function merges_as_yaml(name)
  return MERGED[name] or name:match("^values.*%.ya?ml$") ~= nil
end

--- repo.merge_default(default_dir, target_dir, shown) : files of default_dir missing in
--- target_dir are copied; bitops.config.yaml and values*.yaml present in both are deep-merged
--- (mappings key by key, the environment's value winning; a list or scalar of the
--- environment replaces _default's whole); every other file of the environment is kept as it
--- is. shown = {default = "_default/ansible", target = "dev/ansible", tool = "ansible"}: how
--- messages name the two folders (the target is a working copy the user never sees), and the
--- folder's tool (default: the folder's name).
--- A tool's settings may be nested under its name (`ansible: {cli: ...}`, BitOps' form) or
--- not (`cli: ...`): both bitops.config.yaml files are brought to the nested form before the
--- merge, so that the environment wins whichever form each file uses.
function repo.merge_default(default_dir, target_dir, shown)
  shown = shown or {default = default_dir, target = target_dir}
  local tool = shown.tool or fs.basename(default_dir)
  local function nested(doc, path)
    if doc == nil or not MERGED[path] or type(doc[tool]) == "table" then return doc end
    return {[tool] = doc}
  end
  local entries, err = fs.walk(default_dir)
  if not entries then failure.raise("cannot read " .. default_dir .. ": " .. err) end
  for _, e in ipairs(entries) do
    local src, dst = fs.join(default_dir, e.path), fs.join(target_dir, e.path)
    if e.type == "directory" then
      if not fs.exists(dst) then assert(fs.mkdir_p(dst)) end
    elseif e.type == "file" then
      if not fs.exists(dst) then
        assert(fs.copy(src, dst))
      elseif merges_as_yaml(fs.basename(e.path)) then
        local base = nested(config.load_yaml(src, fs.join(shown.default, e.path)), e.path)
        local over = nested(config.load_yaml(dst, fs.join(shown.target, e.path)), e.path)
        assert(fs.write_atomic(dst, yaml.dump(config.deep_merge(base or {}, over or {}))))
      end
    end
  end
end

--- Working copies kept between runs (docs/config.md, "The working copy"). A run takes an
--- environment's kept copy by renaming it into its own working directory, so no two runs
--- ever share one, and brings it in line with the repo with fs.sync_tree, which writes only
--- what differs; once the environment's steps have ended it brings the copy back in line
--- (undoing the run's writes) and gives it back. Where creating files is what costs (most
--- of a no-op deploy on ext4), nothing is created.
---
--- repo.kept_copies(key) -> the folder of key's kept copies, $TMPDIR/opsrun-copies-<uid>/<name>-<hash>,
--- or nil when OPSRUN_KEEP_COPIES is 0 (false, no, off) or the top folder is not a 0700 folder of ours (then
--- every run copies afresh, as BitOps does). key: what names the repo (its lock scope, so
--- that opsrun serve's checkouts of one repo share them, or its path).
function repo.kept_copies(key)
  local off = (os.getenv("OPSRUN_KEEP_COPIES") or ""):lower()
  if off == "0" or off == "false" or off == "no" or off == "off" then return nil end
  local base = os.getenv("TMPDIR")
  if base == nil or base == "" then base = "/tmp" end
  local uid = sys.uid()
  local top = fs.join(base, "opsrun-copies-" .. uid)
  local st = fs.lstat(top)
  if not st and fs.mkdir(top, {mode = "0700"}) then st = fs.lstat(top) end
  -- a folder someone else made, or readable by others, is not trusted with copies
  if not st or st.type ~= "directory" or st.uid ~= uid or st.mode & 63 ~= 0 then return nil end
  local h = 2166136261 -- FNV-1a: a name, not a secret (a collision only costs a full sync)
  for i = 1, #key do h = ((h ~ key:byte(i)) * 16777619) & 0xffffffff end
  local name = string.format("%s-%08x", (fs.basename(key):gsub("[^%w_.-]", "_")):sub(1, 40), h)
  -- the copies of repos no run has used for KEPT_DAYS go (every run moves its copies in
  -- and out of its repo's folder, which keeps that folder's mtime recent)
  local old = os.time() - repo.KEPT_DAYS * 86400
  for _, other in ipairs(fs.list(top) or {}) do
    local ost = other ~= name and fs.lstat(fs.join(top, other))
    if ost and ost.mtime < old then fs.remove(fs.join(top, other), {recursive = true}) end
  end
  local dir = fs.join(top, name)
  if not fs.exists(dir) and not fs.mkdir(dir, {mode = "0700"}) and not fs.exists(dir) then return nil end
  return dir
end
repo.KEPT_DAYS = 7

-- A top-level folder that is an environment of its own: its settings, or a tool folder.
local function looks_like_environment(root, name)
  if fs.type(fs.join(root, name, "bitops.config.yaml")) == "file" then return true end
  for _, tool in ipairs(repo.DEFAULT_ORDER) do
    if is_dir(fs.join(root, name, tool)) then return true end
  end
  return false
end

--- repo.shared_entries(root, deployed) -> the names at the repo's top level that a run's
--- working copy holds besides the environments it deploys (deployed: name -> true). BitOps
--- copies the whole repo, so a tool may reach these by a relative path (a terraform module's
--- `source = "../../modules/vpc"`, a playbook's `../../scripts/`): every entry but the
--- hidden ones (.git, .opsrun), the environments deployed (copied with _default merged) and
--- folders that are another environment (repo.environments lists every folder; these have
--- a bitops.config.yaml or a tool folder). _default is one, as it is in the repo.
--- Returns the names, and those of them that are folders (a set).
function repo.shared_entries(root, deployed)
  local names, err = fs.list(root)
  if not names then failure.raise("cannot read the operations repo: " .. err) end
  local out, dirs = {}, {}
  for _, name in ipairs(names) do
    if name:sub(1, 1) ~= "." and not deployed[name] then
      local t = fs.type(fs.join(root, name), {follow = false})
      if t == "file" or t == "link" then
        out[#out + 1] = name
      elseif t == "directory" and (name == repo.DEFAULT_DIR or not looks_like_environment(root, name)) then
        out[#out + 1] = name
        dirs[name] = true
      end
    end
  end
  return out, dirs
end

-- Brings workdir/name in line with root/name (a folder: the kept copy reused, as for an
-- environment; a file or a symlink: copied, the link's target text verbatim).
local function copy_in(root, name, workdir, kept, what)
  local dst, src = fs.join(workdir, name), fs.join(root, name)
  local t = fs.type(src, {follow = false})
  if t == "file" then
    local ok, err = fs.copy(src, dst)
    if not ok then failure.raise("cannot copy " .. name .. ": " .. err) end
    return dst
  elseif t == "link" then
    local target, err = fs.readlink(src)
    local ok = target and fs.symlink(target, dst)
    if not ok then failure.raise("cannot copy the symlink " .. name .. ": " .. tostring(err)) end
    return dst
  end
  local reused = kept and fs.rename(fs.join(kept, name), dst)
  local done, err = fs.sync_tree(src, dst)
  if not done and reused then -- a kept copy that cannot be brought in line: start afresh
    fs.remove(dst, {recursive = true})
    done, err = fs.sync_tree(src, dst)
  end
  if not done then failure.raise("cannot copy " .. (what or "") .. "'" .. name .. "': " .. err) end
  return dst
end

--- repo.shared_copy(root, name, workdir [, kept]) : one of repo.shared_entries into the
--- working copy, as it is in the repo (nothing merged); given back with repo.keep_copy
function repo.shared_copy(root, name, workdir, kept)
  return copy_in(root, name, workdir, kept)
end

--- repo.working_copy(root, env, workdir, tools [, kept]) -> path of the environment's copy,
--- with _default/<folder>/ merged into each <folder>/ the environment has (repo.merge_default)
--- and _default/bitops.config.yaml under the environment's. tools: folder -> the tool
--- deploying it, where they differ (a bitops.deployments plugin:). kept: repo.kept_copies'
--- folder, whose copy of env (if any, and if no other run holds it) is reused.
function repo.working_copy(root, env, workdir, tools, kept)
  local dst = copy_in(root, env, workdir, kept, "environment ")
  local default = fs.join(root, repo.DEFAULT_DIR)
  if is_dir(default) then
    for _, name in ipairs(assert(fs.list(default))) do
      local from = fs.join(default, name)
      if is_dir(from) and is_dir(fs.join(dst, name)) then
        repo.merge_default(from, fs.join(dst, name),
          {default = fs.join(repo.DEFAULT_DIR, name), target = fs.join(env, name), tool = tools and tools[name]})
      end
    end
    local env_cfg = fs.join(default, "bitops.config.yaml")
    if fs.exists(env_cfg) then
      local target = fs.join(dst, "bitops.config.yaml")
      if fs.exists(target) then
        local merged = config.deep_merge(
          config.load_yaml(env_cfg, fs.join(repo.DEFAULT_DIR, "bitops.config.yaml")) or {},
          config.load_yaml(target, fs.join(env, "bitops.config.yaml")) or {})
        assert(fs.write_atomic(target, yaml.dump(merged)))
      else
        assert(fs.copy(env_cfg, target))
      end
    end
  end
  return dst
end

--- repo.keep_copy(root, env, workdir, kept) : the run's copy of env brought back in line
--- with the repo (what the run added removed, what it edited restored: nothing a run wrote,
--- secrets a hook put in a file included, stays on disk) and given back to kept for the
--- next run (unless another run kept one meanwhile: then it stays in workdir, removed with
--- it, as is a copy that cannot be brought in line).
function repo.keep_copy(root, env, workdir, kept)
  local dst = fs.join(workdir, env)
  if fs.sync_tree(fs.join(root, env), dst) then
    fs.rename(dst, fs.join(kept, env))
  end
end

--- repo.changed_environments(root, rev) -> set of environment names whose files (or
--- _default's) differ between rev and the working tree; "_default" marks all. The repo may
--- be a folder of a larger git repository: paths are taken relative to root.
function repo.changed_environments(root, rev)
  if type(rev) ~= "string" or rev == "" or rev:sub(1, 1) == "-" then
    failure.raise("--changed-since needs a revision (a commit, tag or branch), not '" .. tostring(rev) .. "'")
  end
  local r, err = proc.run({"git", "-C", root, "diff", "--name-only", "--no-renames", "--relative", rev, "--"}, {timeout = 120})
  if not r then failure.raise("--changed-since: " .. err) end
  if not r.ok then
    failure.raise("--changed-since " .. rev .. ": git diff failed: " .. (r.stderr:gsub("%s+$", "")))
  end
  -- untracked files count as changes too
  local u = proc.run({"git", "-C", root, "ls-files", "--others", "--exclude-standard"}, {timeout = 120})
  local changed = {}
  for _, out in ipairs({r.stdout, u and u.ok and u.stdout or ""}) do
    for path in out:gmatch("[^\n]+") do
      local top = path:match("^([^/]+)/")
      if top then changed[top] = true end
    end
  end
  return changed
end

--- repo.mask_patterns(masks, shown) -> {{pattern, replacement}} from bitops.logging.masks
--- (BitOps gives Python regexes: the common subset is translated to Lua patterns)
function repo.mask_patterns(masks, shown)
  local out = {}
  if masks == nil or masks == yaml.null then return out end
  if type(masks) ~= "table" then failure.raise(shown .. ": bitops.logging.masks must be a list") end
  for i, m in ipairs(masks) do
    local where = string.format("%s: bitops.logging.masks[%d]", shown, i)
    if type(m) ~= "table" then failure.raise(where .. " must be a mapping with search: (and replace:)") end
    local pattern
    if type(m.pattern) == "string" then
      pattern = m.pattern
    elseif type(m.search) == "string" then
      pattern = repo.regex_to_pattern(m.search, where)
    else
      failure.raise(where .. " needs search: (a regex) or pattern: (a Lua pattern)")
    end
    local ok, err = pcall(string.find, "", pattern)
    if not ok then failure.raise(where .. ": bad pattern: " .. tostring(err)) end
    local replacement = type(m.replace) == "string" and m.replace or "***"
    if type(m.search) == "string" and not m.pattern then replacement = repo.regex_replacement(replacement) end
    out[#out + 1] = {pattern, replacement, raw = true}
  end
  return out
end

--- repo.regex_to_pattern(re, where) -> a Lua pattern for the common regex subset:
--- literals, ., [...] classes, \d \w \s and escaped punctuation, * + ? and their lazy forms,
--- ^ and $, and (...) groups (captures, for \1 in the replacement). Alternation (|),
--- counted repeats ({n}) and quantified groups cannot be written as Lua patterns: refused.
function repo.regex_to_pattern(re, where)
  local out, i, n = {}, 1, #re
  local depth = 0
  local function unsupported(what)
    failure.raise(string.format("%s: the regex %q uses %s, which opsrun cannot translate; give a Lua pattern as pattern: instead", where, re, what))
  end
  while i <= n do
    local c = re:sub(i, i)
    local nxt = re:sub(i + 1, i + 1)
    if c == "\\" then
      local map = {d = "%d", w = "[%w_]", s = "%s", D = "%D", W = "[^%w_]", S = "%S"}
      if map[nxt] then out[#out + 1] = map[nxt]
      elseif nxt:match("%p") then out[#out + 1] = "%" .. nxt
      else unsupported("\\" .. nxt) end
      i = i + 2
    elseif c == "[" then
      local j = re:find("]", i + 2, true)
      if not j then unsupported("an unclosed [") end
      local class = re:sub(i, j):gsub("\\d", "%%d"):gsub("\\w", "%%w_"):gsub("\\s", "%%s"):gsub("\\(%p)", "%%%1")
      out[#out + 1] = class
      i = j + 1
    elseif c == "(" then
      if nxt == "?" then unsupported("(?...)") end
      depth = depth + 1
      out[#out + 1] = "("
      i = i + 1
    elseif c == ")" then
      if depth == 0 then unsupported("an unopened )") end
      depth = depth - 1
      out[#out + 1] = ")"
      i = i + 1
      if re:sub(i, i):match("[%*%+%?{]") then unsupported("a repeated group") end
    elseif c == "|" or c == "{" then
      unsupported("'" .. c .. "'")
    elseif c == "*" or c == "+" or c == "?" then
      if nxt == "?" then
        if c == "*" then out[#out + 1] = "-"
        elseif c == "+" then out[#out + 1] = out[#out]; out[#out + 1] = "-" -- x+? is x x-
        else out[#out + 1] = "?" end
        i = i + 2
      else
        out[#out + 1] = c
        i = i + 1
      end
    elseif c == "." or c == "^" or c == "$" then
      out[#out + 1] = (c == "^" and i ~= 1) and "%^" or (c == "$" and i ~= n) and "%$" or c
      i = i + 1
    elseif c:match("%p") then
      out[#out + 1] = "%" .. c
      i = i + 1
    else
      out[#out + 1] = c
      i = i + 1
    end
  end
  if depth ~= 0 then unsupported("an unclosed (") end
  return table.concat(out)
end

--- repo.regex_replacement(s) -> the replacement for string.gsub: \1..\9 become %1..%9
function repo.regex_replacement(s)
  return (s:gsub("%%", "%%%%"):gsub("\\(%d)", "%%%1"))
end

return repo
