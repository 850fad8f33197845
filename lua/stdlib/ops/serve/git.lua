-- ops.serve.git: a kept mirror per hook, fetched on each push; changed paths from
-- `git diff --name-status before after` (a push payload's commit list is capped).
local fs = require "ops.fs"
local proc = require "ops.proc"
local failure = require "ops.deploy.failure"

local git = {}

-- The URL as it may be shown (messages are logged and stored): without user and password.
local shown_url = require("ops.log").public_url
git.shown_url = shown_url

-- git's own messages may quote the URL: take its credentials out of them too.
local function scrub(text, url)
  local userinfo = url:match("^%a[%w+.-]*://([^/@]*)@")
  if not userinfo or userinfo == "" then return text end
  text = text:gsub(userinfo:gsub("%p", "%%%0") .. "@", "")
  local password = userinfo:match(":(.*)$")
  if password and password ~= "" then text = text:gsub(password:gsub("%p", "%%%0"), "***") end
  return text
end

local function run(argv, what, url)
  local r, err = proc.run(argv, {timeout = 600, env = {GIT_TERMINAL_PROMPT = "0"}})
  local clean = function(t) return url and scrub(t, url) or t end
  if not r then failure.raise(what .. ": " .. clean(err)) end
  if not r.ok then failure.raise(what .. ": " .. clean((r.stderr:gsub("%s+$", "")))) end
  return r
end

--- git.mirror(dir, url) -> dir, fetched up to date
function git.mirror(dir, url)
  if fs.exists(fs.join(dir, "HEAD")) then
    run({"git", "--git-dir", dir, "fetch", "--quiet", "--prune", "origin", "+refs/heads/*:refs/heads/*"},
      "git fetch of " .. shown_url(url), url)
  else
    assert(fs.mkdir_p(fs.dirname(dir)))
    local tmp = dir .. ".tmp"
    fs.remove(tmp, {recursive = true})
    run({"git", "clone", "--quiet", "--mirror", "--", url, tmp}, "git clone of " .. shown_url(url), url)
    assert(fs.rename(tmp, dir))
  end
  return dir
end

--- git.has_commit(dir, sha) -> boolean
function git.has_commit(dir, sha)
  local r = proc.run({"git", "--git-dir", dir, "cat-file", "-e", sha .. "^{commit}"}, {stderr = "ignore"})
  return r ~= nil and r.ok
end

--- git.is_ancestor(dir, a, b) -> true when commit a is reachable from commit b
function git.is_ancestor(dir, a, b)
  local r = proc.run({"git", "--git-dir", dir, "merge-base", "--is-ancestor", a, b}, {stderr = "ignore"})
  return r ~= nil and r.ok
end

--- git.changes(dir, before, after) -> {{status = "A"|"M"|"D", path = ...}}; with no
--- before (a new branch, or a before lost to a forced push and gc), every file is added
function git.changes(dir, before, after)
  local argv
  if before then
    argv = {"git", "--git-dir", dir, "diff", "--name-status", "--no-renames", "-z", before, after, "--"}
  else
    argv = {"git", "--git-dir", dir, "ls-tree", "-r", "--name-only", "-z", after}
  end
  local r = run(argv, "git diff")
  local out, fields = {}, {}
  for f in r.stdout:gmatch("([^%z]+)") do fields[#fields + 1] = f end
  if before then
    for i = 1, #fields - 1, 2 do
      local st = fields[i]:sub(1, 1)
      out[#out + 1] = {status = (st == "T") and "M" or st, path = fields[i + 1]}
    end
  else
    for _, p in ipairs(fields) do out[#out + 1] = {status = "A", path = p} end
  end
  return out
end

--- git.show(dir, rev, path) -> the file's content at rev | nil
function git.show(dir, rev, path)
  local r = proc.run({"git", "--git-dir", dir, "show", rev .. ":" .. path}, {stderr = "ignore", capture_limit = 64 * 1024 * 1024})
  if r and r.ok then return r.stdout end
  return nil
end

--- git.checkout(dir, rev, target) : the tree at rev, in target (a fresh folder)
function git.checkout(dir, rev, target)
  run({"git", "clone", "--quiet", "--shared", "--no-checkout", "--", dir, target}, "git clone of the mirror")
  run({"git", "-C", target, "checkout", "--quiet", "--detach", rev}, "git checkout " .. rev)
end

return git
