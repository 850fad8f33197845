-- ops.serve.config: opsrun-serve.yaml (or serve.lua returning the same table).
--
--   listen: "127.0.0.1:8080"          # or unix:/run/opsrun.sock
--   store: /var/lib/opsrun/opsrun.db  # default: the deploy store
--   mirrors: /var/lib/opsrun/mirrors  # kept git mirrors (default: next to the store)
--   jobs: 4                           # targets deployed at once
--   drain: 30                         # seconds to finish work on SIGTERM
--   notify: {command: [...], url_env: NOTIFY_URL}
--   hooks:
--     ops:                            # POST /hooks/ops
--       provider: github              # github | gitlab | gitea | forgejo
--       repo: https://github.com/acme/ops.git
--       branch: main
--       secret_env: OPSRUN_OPS_SECRET # or secret_file: /run/secrets/ops
--       mode: environments            # environments | plans
local fs = require "ops.fs"
local sys = require "ops.sys"
local log = require "ops.log"
local yaml = require "ops.yaml"
local verify = require "ops.serve.verify"
local failure = require "ops.deploy.failure"
local history = require "ops.deploy.history"

local config = {}

local function bad(file, key, why) failure.raise(string.format("%s: %s %s", file, key, why)) end

local function read_secret(file, name, h)
  if h.secret ~= nil then
    bad(file, "hooks." .. name .. ".secret", "must not be written in the config: give secret_env (a variable's name) or secret_file")
  end
  local secret
  if h.secret_env then
    if type(h.secret_env) ~= "string" then bad(file, "hooks." .. name .. ".secret_env", "must be a variable name") end
    secret = sys.getenv(h.secret_env)
    if not secret or secret == "" then
      bad(file, "hooks." .. name .. ".secret_env", "names " .. h.secret_env .. ", which is not set")
    end
  elseif h.secret_file then
    local text, err = fs.read(tostring(h.secret_file))
    if not text then bad(file, "hooks." .. name .. ".secret_file", "cannot be read: " .. err) end
    secret = text:gsub("%s+$", "")
    if secret == "" then bad(file, "hooks." .. name .. ".secret_file", "is empty") end
  else
    bad(file, "hooks." .. name, "needs secret_env or secret_file (deliveries are verified with it)")
  end
  log.secret(secret)
  return secret
end

--- config.load(path) -> settings (validated, secrets read and registered)
function config.load(path)
  local raw
  if path:match("%.lua$") then
    local chunk, err = loadfile(path, "t")
    if not chunk then failure.raise(err) end
    raw = chunk()
  else
    local text, err = fs.read(path)
    if not text then failure.raise("cannot read the serve config: " .. err) end
    local v, yerr = yaml.load(text, path)
    if v == nil then failure.raise(yerr) end
    raw = v
  end
  if type(raw) ~= "table" then failure.raise(path .. ": expected a mapping of settings") end
  return config.check(raw, path)
end

function config.check(raw, file)
  local c = {
    listen = raw.listen or "127.0.0.1:8080",
    store = raw.store or history.default_path(),
    jobs = math.tointeger(raw.jobs or 4),
    drain = tonumber(raw.drain or 30),
    lease = tonumber(raw.lease or 60),
    max_body = math.tointeger(raw.max_body or 25 * 1024 * 1024),
    notify = raw.notify,
    hooks = {},
    file = file,
  }
  if type(c.listen) ~= "string" then bad(file, "listen", "must be a string like 127.0.0.1:8080") end
  if not c.jobs or c.jobs < 1 then bad(file, "jobs", "must be a whole number of at least 1") end
  if not c.drain or c.drain < 0 then bad(file, "drain", "must be a number of seconds") end
  if not c.lease or c.lease < 5 then bad(file, "lease", "must be at least 5 seconds") end
  c.mirrors = raw.mirrors or (fs.dirname(c.store) .. "/mirrors")
  if type(raw.hooks) ~= "table" or next(raw.hooks) == nil then
    bad(file, "hooks", "must name at least one hook (hooks: {NAME: {provider, repo, branch, secret_env}})")
  end
  for name, h in pairs(raw.hooks) do
    if type(name) ~= "string" or not name:match("^[%w_%-%.]+$") or name:match("^%.") then
      bad(file, "hooks." .. tostring(name), "is not a valid hook name (letters, digits, _ - .)")
    end
    if type(h) ~= "table" then bad(file, "hooks." .. name, "must be a mapping") end
    local provider = h.provider or "github"
    if not verify.providers[provider] then
      bad(file, "hooks." .. name .. ".provider", "must be github, gitlab, gitea or forgejo, not " .. tostring(provider))
    end
    if type(h.repo) ~= "string" or h.repo == "" then
      bad(file, "hooks." .. name .. ".repo", "is required: the git URL (or path) of the operations repo")
    end
    local mode = h.mode or "environments"
    if mode ~= "environments" and mode ~= "plans" then
      bad(file, "hooks." .. name .. ".mode", "must be environments or plans")
    end
    c.hooks[name] = {
      name = name, provider = provider, repo = h.repo, branch = h.branch or "main",
      secret = read_secret(file, name, h), mode = mode, plans = h.plans or {},
      envs = h.environments, jobs = h.jobs, deploy = h.deploy or {},
    }
  end
  return c
end

return config
