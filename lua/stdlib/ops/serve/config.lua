-- ops.serve.config: opsrun-serve.yaml (or serve.lua returning the same table).
--
--   listen: "127.0.0.1:8080"          # or [::1]:8080, unix:/run/opsrun.sock
--   store: /var/lib/opsrun/opsrun.db  # default: the deploy store ($OPSRUN_STORE, ...)
--   mirrors: /var/lib/opsrun/mirrors  # kept git mirrors (default: next to the store)
--   jobs: 4                           # targets (hooks) deployed at once
--   drain: 30                         # seconds to finish work on SIGTERM
--   lease: 60                         # seconds a worker's claim lasts without renewal
--   coalesce: 0.01                    # seconds a busy hook waits before its next group
--   max_body: 26214400                # largest delivery, in bytes (413 above)
--   keep_days: 30                     # done deliveries kept (their ids de-duplicate)
--   log_limit: 10                     # lines per hook and kind about bad deliveries ...
--   log_window: 60                    # ... in each window of this many seconds (0: no limit)
--   notify: {command: [...], url_env: NOTIFY_URL}
--   hooks:
--     ops:                            # POST /hooks/ops
--       provider: github              # github | gitlab | gitea | forgejo
--       repo: https://github.com/acme/ops.git
--       branch: main
--       secret_env: OPSRUN_OPS_SECRET # or secret_file: /run/secrets/ops
--       mode: environments            # environments | plans
--       environments: [staging, prod] # optional: only these are deployed from pushes
--       jobs: 4                       # steps at once inside one deploy
--       deploy: {fail_fast: true, timeout: 3600}
--       plans: {...}                  # settings of the plans mapper (docs/serve.md)
-- Every setting a user can get wrong fails with the file, the key and the fix.
local fs = require "ops.fs"
local sys = require "ops.sys"
local log = require "ops.log"
local yaml = require "ops.yaml"
local verify = require "ops.serve.verify"
local failure = require "ops.deploy.failure"
local history = require "ops.deploy.history"

local config = {}

config.KEYS = {"listen", "store", "mirrors", "jobs", "drain", "lease", "coalesce", "max_body", "keep_days", "log_limit",
  "log_window", "notify", "hooks"}
config.HOOK_KEYS = {"provider", "repo", "branch", "secret_env", "secret_file", "mode", "environments",
  "jobs", "deploy", "plans"}
config.MODES = {environments = true, plans = true}

local function bad(file, key, why) failure.raise(string.format("%s: %s %s", file, key, why)) end

local function check_keys(file, prefix, t, known)
  local set = {}
  for _, k in ipairs(known) do set[k] = true end
  for k in pairs(t) do
    if not set[k] then
      bad(file, prefix .. tostring(k), "is not a setting (known: " .. table.concat(known, ", ") .. ")")
    end
  end
end

local function read_secret(file, name, h, opts)
  local key = "hooks." .. name
  if h.secret_env ~= nil and h.secret_file ~= nil then
    bad(file, key, "gives both secret_env and secret_file: keep one")
  end
  if opts.secrets == false then return nil end
  local secret
  if h.secret_env ~= nil then
    if type(h.secret_env) ~= "string" or not h.secret_env:match("^[%a_][%w_]*$") then
      bad(file, key .. ".secret_env", "must be the name of an environment variable")
    end
    secret = sys.getenv(h.secret_env)
    if not secret or secret == "" then
      bad(file, key .. ".secret_env", "names " .. h.secret_env .. ", which is not set: export it before opsrun serve")
    end
  elseif h.secret_file ~= nil then
    local text, err = fs.read(tostring(h.secret_file))
    if not text then bad(file, key .. ".secret_file", "cannot be read: " .. err) end
    secret = text:gsub("%s+$", "")
    if secret == "" then bad(file, key .. ".secret_file", "is empty: write the hook's secret into " .. tostring(h.secret_file)) end
  else
    bad(file, key, "needs secret_env or secret_file (deliveries are verified with it)")
  end
  if #secret < 8 then bad(file, key, "has a secret of " .. #secret .. " characters: use at least 8 (openssl rand -hex 32)") end
  log.secret(secret)
  return secret
end

--- config.load(path [, {secrets = false}]) -> settings (validated; secrets read and
--- registered with ops.log unless secrets = false, for `opsrun serve status`)
function config.load(path, opts)
  local raw
  if path:match("%.lua$") then
    local chunk, err = loadfile(path, "t")
    if not chunk then failure.raise("cannot load the serve config: " .. err) end
    local ok, v = pcall(chunk)
    if not ok then failure.raise(path .. ": " .. failure.message(v)) end
    raw = v
  else
    local text, err = fs.read(path)
    if not text then failure.raise("cannot read the serve config: " .. err) end
    local v, yerr = yaml.load(text, path)
    if v == nil then failure.raise(yerr) end
    raw = v
  end
  if type(raw) ~= "table" then failure.raise(path .. ": expected a mapping of settings (listen, store, hooks, ...)") end
  return config.check(raw, path, opts)
end

-- a finite number in [min, max] (max: none when nil); NaN and infinities are refused
local function number(file, key, v, default, min, whole, max)
  if v == nil or v == yaml.null then return default end
  local n = tonumber(v)
  if whole then n = n and math.tointeger(n) end
  if not n or n ~= n or n < min or n == math.huge or (max and n > max) then
    bad(file, key, string.format("must be a %s of at least %s%s, not %s", whole and "whole number" or "number",
      tostring(min), max and (" and at most " .. tostring(max)) or "", tostring(v)))
  end
  return n
end

function config.check(raw, file, opts)
  opts = opts or {}
  check_keys(file, "", raw, config.KEYS)
  local c = {
    listen = raw.listen or "127.0.0.1:8080",
    store = raw.store or history.default_path(),
    jobs = number(file, "jobs", raw.jobs, 4, 1, true),
    drain = number(file, "drain", raw.drain, 30, 0),
    lease = number(file, "lease", raw.lease, 60, 5),
    coalesce = number(file, "coalesce", raw.coalesce, 0.01, 0, false, 3600),
    max_body = number(file, "max_body", raw.max_body, 25 * 1024 * 1024, 1024, true),
    keep_days = number(file, "keep_days", raw.keep_days, 30, 0),
    log_limit = number(file, "log_limit", raw.log_limit, 10, 0, true),
    log_window = number(file, "log_window", raw.log_window, 60, 0),
    hooks = {},
    file = file,
  }
  if type(c.listen) ~= "string" then bad(file, "listen", "must be a string like 127.0.0.1:8080 or unix:/run/opsrun.sock") end
  if type(c.store) ~= "string" then bad(file, "store", "must be a path") end
  c.mirrors = raw.mirrors or (fs.dirname(c.store) .. "/mirrors")
  if type(c.mirrors) ~= "string" then bad(file, "mirrors", "must be a path") end
  if raw.notify ~= nil then
    local n = raw.notify
    if type(n) ~= "table" then bad(file, "notify", "must be a mapping {command: [...], url: ..., url_env: ...}") end
    check_keys(file, "notify.", n, {"command", "url", "url_env"})
    if n.command ~= nil and (type(n.command) ~= "table" or #n.command == 0) then
      bad(file, "notify.command", "must be a list: the program and its arguments, e.g. [/usr/local/bin/notify, --json]")
    end
    if n.url ~= nil and (type(n.url) ~= "string" or not n.url:match("^https?://")) then
      bad(file, "notify.url", "must be an http:// or https:// URL (or give url_env: a variable holding it)")
    end
    if n.url_env ~= nil and type(n.url_env) ~= "string" then bad(file, "notify.url_env", "must be a variable name") end
    c.notify = n
  end
  if type(raw.hooks) ~= "table" or next(raw.hooks) == nil then
    bad(file, "hooks", "must name at least one hook (hooks: {NAME: {provider, repo, branch, secret_env}})")
  end
  for name, h in pairs(raw.hooks) do
    if type(name) ~= "string" or not name:match("^[%w_%-%.]+$") or name:match("^%.") then
      bad(file, "hooks." .. tostring(name), "is not a valid hook name (letters, digits, _ - ., not starting with .)")
    end
    local key = "hooks." .. name
    if type(h) ~= "table" then bad(file, key, "must be a mapping {provider, repo, branch, secret_env}") end
    if h.secret ~= nil then
      bad(file, key .. ".secret", "must not be written in the config: give secret_env (a variable's name) or secret_file")
    end
    check_keys(file, key .. ".", h, config.HOOK_KEYS)
    local provider = h.provider or "github"
    if not verify.providers[provider] then
      bad(file, key .. ".provider", "must be github, gitlab, gitea or forgejo, not " .. tostring(provider))
    end
    if type(h.repo) ~= "string" or h.repo == "" then
      bad(file, key .. ".repo", "is required: the git URL (or path) of the operations repo")
    end
    local branch = h.branch or "main"
    if type(branch) ~= "string" or branch == "" or branch:find("%.%.") or branch:match("^refs/") then
      bad(file, key .. ".branch", "must be a branch name such as main (without refs/heads/)")
    end
    local mode = h.mode or "environments"
    if not config.MODES[mode] then
      bad(file, key .. ".mode", "must be environments or plans, not " .. tostring(mode))
    end
    local envs = h.environments
    if envs ~= nil then
      if type(envs) ~= "table" or #envs == 0 then
        bad(file, key .. ".environments", "must be a list of environment names, e.g. [staging, prod]")
      end
      for _, e in ipairs(envs) do
        if type(e) ~= "string" then bad(file, key .. ".environments", "must hold only names") end
      end
    end
    local deploy = h.deploy or {}
    if type(deploy) ~= "table" then bad(file, key .. ".deploy", "must be a mapping {fail_fast, timeout}") end
    check_keys(file, key .. ".deploy.", deploy, {"fail_fast", "timeout"})
    if deploy.fail_fast ~= nil and type(deploy.fail_fast) ~= "boolean" then
      bad(file, key .. ".deploy.fail_fast", "must be true or false")
    end
    number(file, key .. ".deploy.timeout", deploy.timeout, nil, 1)
    if h.plans ~= nil and type(h.plans) ~= "table" then bad(file, key .. ".plans", "must be a mapping") end
    c.hooks[name] = {
      name = name, provider = provider, repo = h.repo, branch = branch,
      secret = read_secret(file, name, h, opts), secret_env = h.secret_env, secret_file = h.secret_file,
      mode = mode, plans = h.plans or {}, envs = envs,
      jobs = number(file, key .. ".jobs", h.jobs, nil, 1, true), deploy = deploy,
    }
  end
  return c
end

return config
