-- ops.serve.plans: the nuclio GitOps mapper. A plan file <setup…>/<namespace>/<name>.yaml
-- is one Helm release: added → helm install, modified → helm upgrade --install, removed →
-- helm uninstall (the plan read from the before commit); a change to the values file a plan
-- names upgrades that plan. Each setup's kubeconfig is fetched over HTTP from the kubeconfig
-- store. The reference for users is docs/parts/serve-plans.md.
local fs = require "ops.fs"
local sys = require "ops.sys"
local log = require "ops.log"
local yaml = require "ops.yaml"
local proc = require "ops.proc"
local http = require "ops.http"
local time = require "ops.time"
local failure = require "ops.deploy.failure"
local history = require "ops.deploy.history"
local git = require "ops.serve.git"

local M = {}

M.HOOKS = {"pre-install", "post-install", "pre-upgrade", "post-upgrade"}
M.DEFAULTS = {setup_name_size = 2, shell = "/bin/bash", kubeconfig_filename = "kubeconfig.yaml"}
-- The kubeconfig store is asked again after a refused connection or a 5xx answer.
M.KUBECONFIG_RETRY = {attempts = 3, backoff = 1, max_backoff = 4}
-- Seconds a hook script or a helm command may take when the hook sets no deploy.timeout.
M.COMMAND_TIMEOUT = 1800

local PLAN_KEYS = {chart = true, version = true, values = true, hooks = true, release = true}
local KNOWN_HOOK = {}
for _, h in ipairs(M.HOOKS) do KNOWN_HOOK[h] = true end
local TAIL_LINES = 40

-- A config value, with YAML null and "" meaning absent.
local function present(v)
  if v == nil or v == yaml.null or v == "" then return nil end
  return v
end

local function split(path)
  local parts = {}
  for seg in path:gmatch("[^/]+") do parts[#parts + 1] = seg end
  return parts
end

-- The URL as it may be shown: without the user and password.
local shown_url = log.public_url

local function url_segment(s)
  return (s:gsub("[^%w%-%._~]", function(c) return string.format("%%%02X", c:byte()) end))
end

--- M.settings(hook) -> settings | nil, err
--- Each setting is the hook's `plans:` key if given, else its environment variable (the
--- nuclio function's names), else the default.
function M.settings(hook)
  local p = hook.plans or {}
  local at = "hooks." .. hook.name .. ".plans."
  local function pick(key, var)
    local v = present(p[key])
    if v ~= nil then return v, at .. key end
    if var then
      v = present(sys.getenv(var))
      if v ~= nil then return v, var end
    end
    return M.DEFAULTS[key], "the default"
  end
  local s = {}

  local size, from = pick("setup_name_size", "GITOPS_SETUP_NAME_SIZE")
  s.setup_name_size = math.tointeger(tonumber(size))
  if not s.setup_name_size or s.setup_name_size < 1 then
    return nil, string.format("%s is %s: it must be a whole number of at least 1 (how many path "
      .. "parts name a setup)", from, tostring(size))
  end

  s.shell, from = pick("shell", "GITOPS_SHELL_EXEC")
  if type(s.shell) ~= "string" then
    return nil, from .. " must be the path (or name) of a shell, like /bin/bash"
  end

  s.kubeconfig_filename, from = pick("kubeconfig_filename", "GITOPS_KUBECONFIG_FILENAME")
  if type(s.kubeconfig_filename) ~= "string" or s.kubeconfig_filename:sub(1, 1) == "/"
      or s.kubeconfig_filename:find("%.%.") then
    return nil, string.format("%s is %s: it must be a file name (or relative path) under each "
      .. "setup's folder of the kubeconfig store, like kubeconfig.yaml", from, tostring(s.kubeconfig_filename))
  end

  local url = present(p.kubeconfig_repo_url)
  if url ~= nil then
    if type(url) ~= "string" then return nil, at .. "kubeconfig_repo_url must be a URL" end
    if url:match("^%a[%w+.-]*://[^/]*@") then
      return nil, at .. "kubeconfig_repo_url must not carry a user or password (the config is "
        .. "not a place for secrets): give user_env and password_env, or token_env"
    end
    from = at .. "kubeconfig_repo_url"
  else
    url = present(sys.getenv("KUBECONFIG_REPO_URL"))
    from = "KUBECONFIG_REPO_URL"
    -- nuclio's form, http://user:password@host: libcurl sends them as basic auth
    local password = url and url:match("^%a[%w+.-]*://[^/@:]*:([^/@]*)@")
    if password then log.secret(password) end
  end
  if url ~= nil and not url:match("^https?://[^/]") then
    return nil, string.format("%s is %s: it must be an http:// or https:// URL", from, shown_url(url))
  end
  s.kubeconfig_repo_url = url and url:gsub("/+$", "")

  s.secret_vars = {"KUBECONFIG_REPO_URL"}
  local function secret_env(key)
    local name = present(p[key])
    if name == nil then return nil end
    if type(name) ~= "string" then return nil, at .. key .. " must be a variable's name" end
    s.secret_vars[#s.secret_vars + 1] = name
    local v = present(sys.getenv(name))
    if v == nil then return nil, at .. key .. " names " .. name .. ", which is not set" end
    return log.secret(v)
  end
  local user, password, token, err
  user, err = secret_env("user_env")
  if err then return nil, err end
  password, err = secret_env("password_env")
  if err then return nil, err end
  token, err = secret_env("token_env")
  if err then return nil, err end
  if token and (user or password) then
    return nil, at .. "token_env and user_env/password_env: give one way to log in to the kubeconfig store"
  end
  if (user == nil) ~= (password == nil) then
    return nil, at .. "user_env and password_env go together (HTTP basic auth)"
  end
  if token then s.bearer = token elseif user then s.basic = {user, password} end
  return s
end

--- M.locate(path, size) -> place | nil, why
--- place = {path, setup, namespace, file, name}; why is "hidden", "not-yaml", "short" or "deep"
function M.locate(path, size)
  local parts = split(path)
  for _, seg in ipairs(parts) do
    if seg:sub(1, 1) == "." then return nil, "hidden" end
  end
  local file = parts[#parts]
  local name = file:match("^(.+)%.ya?ml$")
  if not name then return nil, "not-yaml" end
  if #parts < size + 2 then return nil, "short" end
  if #parts > size + 2 then return nil, "deep" end
  return {
    path = path, setup = table.concat(parts, "/", 1, size), namespace = parts[size + 1],
    file = file, name = name,
  }
end

local function valid_namespace(name)
  return #name <= 63 and name:match("^[a-z0-9][-a-z0-9]*$") ~= nil and name:match("[a-z0-9]$") ~= nil
end

local function valid_release(name)
  return #name <= 53 and name:match("^[a-z0-9][-a-z0-9.]*$") ~= nil and name:match("[a-z0-9]$") ~= nil
    and not name:find("..", 1, true) and not name:find("%.%-") and not name:find("%-%.")
end

--- M.parse(text, path) -> plan | nil, err : a plan file's content, checked
--- plan = {chart, version, values, release, hooks = {[hook] = {script, ...}}}
function M.parse(text, path)
  local doc, err = yaml.load(text, path)
  if doc == nil then return nil, err end
  if type(doc) ~= "table" then
    return nil, path .. ": a plan must be a mapping (chart, version, values, hooks)"
  end
  for k in pairs(doc) do
    if not PLAN_KEYS[k] then
      return nil, string.format("%s: unknown key %s (a plan has chart, version, values, hooks and "
        .. "release)", path, tostring(k))
    end
  end
  local plan = {hooks = {}}
  plan.chart = present(doc.chart)
  if type(plan.chart) == "string" and plan.chart:sub(1, 1) == "-" then
    return nil, path .. ": chart must not start with '-' (helm would take it as an option)"
  end
  if type(plan.chart) ~= "string" then
    return nil, path .. ": chart is required: the chart to deploy, a repo chart (bitnami/nginx) "
      .. "or the path of a chart folder in the repo (values files and scripts must not sit at a "
      .. "plan's depth: every .yaml there is a plan)"
  end
  local version = present(doc.version)
  if version ~= nil then
    if type(version) ~= "string" and type(version) ~= "number" then
      return nil, path .. ": version must be a chart version, like '1.2.0'"
    end
    plan.version = tostring(version)
    if plan.version:sub(1, 1) == "-" then
      return nil, path .. ": version must not start with '-' (helm would take it as an option)"
    end
  end
  for _, key in ipairs({"values", "release"}) do
    local v = present(doc[key])
    if v ~= nil and type(v) ~= "string" then
      return nil, string.format("%s: %s must be a string", path, key)
    end
    plan[key] = v
  end
  local hooks = present(doc.hooks)
  if hooks ~= nil then
    if type(hooks) ~= "table" then
      return nil, path .. ": hooks must be a mapping of pre-install, post-install, pre-upgrade, post-upgrade"
    end
    for name, scripts in pairs(hooks) do
      if not KNOWN_HOOK[name] then
        return nil, string.format("%s: hooks.%s is not a hook: use pre-install, post-install, "
          .. "pre-upgrade or post-upgrade", path, tostring(name))
      end
      scripts = present(scripts) or {}
      if type(scripts) == "string" then scripts = {scripts} end
      if type(scripts) ~= "table" then
        return nil, string.format("%s: hooks.%s must be a list of script paths", path, name)
      end
      for i, s in ipairs(scripts) do
        if type(s) ~= "string" or s == "" then
          return nil, string.format("%s: hooks.%s[%d] must be a script's path in the repo", path, name, i)
        end
      end
      plan.hooks[name] = scripts
    end
  end
  return plan
end

-- The release and namespace of a place (and its plan, when there is one), checked.
local function identity(place, plan)
  place.release = (plan and plan.release) or place.name
  if not valid_release(place.release) then
    return nil, string.format("%s: release name %q (%s) is not a valid Helm release name: "
      .. "lowercase letters, digits, '-' and '.', starting and ending with a letter or digit, at "
      .. "most 53 characters; rename the file or set release: in the plan", place.path, place.release,
      (plan and plan.release) and "the plan's release" or "the plan file's name")
  end
  if not valid_namespace(place.namespace) then
    return nil, string.format("%s: namespace %q (the folder above the plan) is not a valid "
      .. "Kubernetes namespace: lowercase letters, digits and '-', at most 63 characters",
      place.path, place.namespace)
  end
  return true
end

-- A path a plan names, inside the checkout: the resolved path | nil, err
local function in_repo(checkout, place, key, rel)
  if fs.is_absolute(rel) then
    return nil, string.format("%s: %s is %s, an absolute path: give a path relative to the repo root",
      place.path, key, rel)
  end
  local full, err, code = fs.within(checkout, rel)
  if not full then
    if code == "EOUTSIDE" then
      return nil, string.format("%s: %s (%s) leads outside the repo: give a path inside it",
        place.path, key, rel)
    end
    return nil, string.format("%s: %s (%s): %s", place.path, key, rel, err)
  end
  return full
end

local function repo_file(checkout, place, key, rel)
  local full, err = in_repo(checkout, place, key, rel)
  if not full then return nil, err end
  local st = fs.stat(full)
  if not st or st.type ~= "file" then
    return nil, string.format("%s: %s (%s) is not a file in the repo at this commit", place.path, key, rel)
  end
  return full
end

-- The chart argument: a chart folder (or .tgz) in the repo, confined to it, or else a
-- reference helm resolves itself (repo/chart, oci://…, https://…).
local function chart_ref(checkout, place, chart)
  if chart:match("^%a[%w+.-]*://") then return chart end
  local full, err = in_repo(checkout, place, "chart", chart)
  if not full then return nil, err end
  if fs.stat(full) then return full end
  if chart:sub(1, 1) == "." then
    return nil, string.format("%s: chart (%s) names a path that is not in the repo at this commit",
      place.path, chart)
  end
  return chart
end

-- Walks a kubeconfig for the values that must never be seen, and registers them.
local function register_secrets(doc)
  local SECRET_KEYS = {token = true, password = true, ["client-key-data"] = true,
                       ["client-certificate-data"] = true, ["id-token"] = true, ["refresh-token"] = true}
  local function walk(t, depth)
    if depth > 16 then return end
    for k, v in pairs(t) do
      if type(v) == "table" then walk(v, depth + 1)
      elseif type(v) == "string" and SECRET_KEYS[k] then log.secret(v) end
    end
  end
  walk(doc, 0)
end

--- M.fetch_kubeconfig(settings, setup, file) -> true | nil, err
--- GET <kubeconfig_repo_url>/<setup>/<kubeconfig_filename>, written to file (0600) only when
--- the answer is a 2xx whose body is a kubeconfig. Its content is registered as a secret.
function M.fetch_kubeconfig(settings, setup, file)
  if not settings.kubeconfig_repo_url then
    return nil, "no kubeconfig store: set KUBECONFIG_REPO_URL or hooks.<name>.plans.kubeconfig_repo_url"
  end
  local segs = {}
  for _, s in ipairs(split(setup)) do segs[#segs + 1] = url_segment(s) end
  for _, s in ipairs(split(settings.kubeconfig_filename)) do segs[#segs + 1] = url_segment(s) end
  local url = settings.kubeconfig_repo_url .. "/" .. table.concat(segs, "/")
  local what = "kubeconfig of setup " .. setup .. " (GET " .. shown_url(url) .. ")"
  local res, err = http.request_retry({url = url, basic = settings.basic, bearer = settings.bearer,
    timeout = 30}, M.KUBECONFIG_RETRY)
  if not res then return nil, what .. ": " .. err end
  if res.status < 200 or res.status > 299 then
    local fix = "the store failed: redeliver the push once it works"
    if res.status == 401 or res.status == 403 then
      fix = "check the credentials (plans.user_env/password_env or token_env, or the user:password "
        .. "of KUBECONFIG_REPO_URL)"
    elseif res.status < 500 then
      fix = "check KUBECONFIG_REPO_URL and GITOPS_KUBECONFIG_FILENAME (or their plans: keys), and "
        .. "that the store has this setup's kubeconfig"
    end
    return nil, string.format("%s: the kubeconfig store answered %d, not a kubeconfig: %s", what, res.status, fix)
  end
  local body = res.body or ""
  log.secret(body)
  local doc = yaml.load(body, "kubeconfig")
  if type(doc) ~= "table" or doc.clusters == nil then
    return nil, what .. ": the answer is not a kubeconfig (no clusters: key)"
  end
  register_secrets(doc)
  local ok, werr = fs.write(file, body, "0600")
  if not ok then return nil, what .. ": cannot write it: " .. werr end
  return true
end

-- Runs argv with its output in the log (redacted there) and a tail kept for the store.
local function run_logged(ctx, lg, argv, opts)
  local tail = ctx.tail
  opts = opts or {}
  opts.timeout = opts.timeout or ctx.timeout
  opts.stderr = "stdout"
  opts.stdout = function(line)
    lg.info(line)
    tail[#tail + 1] = log.redact(line)
    if #tail > TAIL_LINES then table.remove(tail, 1) end
  end
  local env = {}
  for k, v in pairs(ctx.env) do env[k] = v end
  for k, v in pairs(opts.env or {}) do env[k] = v end
  opts.env = env
  lg.info("$ " .. table.concat(argv, " "))
  local r, err = proc.run(argv, opts)
  if not r then return {ok = false, failed = err, stdout = ""} end
  return r
end

-- Why a command failed, for a message: helm's "Error: …" line, else its last line.
local function cause(r)
  if r.failed then return r.failed end
  local last, error_line
  for line in (r.stdout or ""):gmatch("[^\n]+") do
    last = line
    if line:match("^Error:") then error_line = line end
  end
  last = error_line or last
  local how = r.timed_out and "timed out" or (r.signal and ("killed by " .. r.signal))
    or ("exit " .. tostring(r.code))
  return how .. (last and (": " .. log.redact(last)) or "")
end

local function run_hooks(ctx, lg, action, which, env)
  for _, script in ipairs(action.plan.hooks[which] or {}) do
    local full, err = repo_file(ctx.job.checkout, action.place, "hooks." .. which, script)
    if not full then return nil, err end
    lg.info(which .. " hook: " .. script)
    env.HOOK = which
    local r = run_logged(ctx, lg, {ctx.settings.shell, full}, {cwd = ctx.job.checkout, env = env})
    if not r.ok then
      return nil, string.format("%s: %s hook %s failed (%s)", action.place.path, which, script, cause(r))
    end
  end
  return true
end

local function helm_argv(verb, action, kubeconfig)
  local place, plan = action.place, action.plan
  local argv = {"helm", verb, place.release}
  if verb == "uninstall" then
    argv[#argv + 1] = "--namespace"
    argv[#argv + 1] = place.namespace
  else
    argv[#argv + 1] = action.chart
    if verb == "upgrade" then argv[#argv + 1] = "--install" end
    for _, a in ipairs({"--namespace", place.namespace, "--create-namespace"}) do argv[#argv + 1] = a end
    if plan.version then
      argv[#argv + 1] = "--version"
      argv[#argv + 1] = plan.version
    end
    if action.values then
      argv[#argv + 1] = "-f"
      argv[#argv + 1] = action.values
    end
  end
  argv[#argv + 1] = "--kubeconfig"
  argv[#argv + 1] = kubeconfig
  return argv
end

-- The kubeconfig of a setup, fetched once per run: path | nil, err
local function kubeconfig_for(ctx, setup)
  local k = ctx.kubeconfigs[setup]
  if not k then
    ctx.count = ctx.count + 1
    local file = fs.join(ctx.dir, "kubeconfig-" .. ctx.count .. ".yaml")
    local ok, err = M.fetch_kubeconfig(ctx.settings, setup, file)
    k = ok and {file = file} or {err = err}
    ctx.kubeconfigs[setup] = k
  end
  return k.file, k.err
end

local function uninstall(ctx, lg, action, kubeconfig)
  local r = run_logged(ctx, lg, helm_argv("uninstall", action, kubeconfig))
  action.code = r.code
  if r.ok then return true end
  if (r.stdout or ""):find("not found", 1, true) then
    lg.info("release " .. action.place.release .. " is not installed: nothing to uninstall")
    action.code = 0
    return true
  end
  return nil, string.format("%s: helm uninstall %s failed (%s)", action.place.path, action.place.release, cause(r))
end

local function install_or_upgrade(ctx, lg, action, kubeconfig)
  local job, place, plan = ctx.job, action.place, action.plan
  local chart, err = chart_ref(job.checkout, place, plan.chart)
  if not chart then return nil, err end
  action.chart = chart
  if plan.values then
    action.values, err = repo_file(job.checkout, place, "values", plan.values)
    if not action.values then return nil, err end
  end
  if action.verb == "install" and not job.before then
    -- no single before commit (a new branch, a forced push, several pushes deployed
    -- together): a release that is already there is upgraded, not installed again
    local r = run_logged(ctx, lg, {"helm", "status", place.release, "--namespace", place.namespace,
      "--kubeconfig", kubeconfig})
    if r.ok then
      lg.info("release " .. place.release .. " exists: upgrading it")
      action.verb = "upgrade"
    elseif not (r.stdout or ""):find("not found", 1, true) then
      return nil, string.format("%s: helm status %s failed (%s)", place.path, place.release, cause(r))
    end
  end
  local env = {
    PLAN = place.path, RELEASE = place.release, NAMESPACE = place.namespace, SETUP = place.setup,
    CHART = plan.chart, KUBECONFIG = kubeconfig, COMMIT = job.after,
  }
  local ok
  ok, err = run_hooks(ctx, lg, action, "pre-" .. action.verb, env)
  if not ok then return nil, err .. ": helm " .. action.verb .. " was not run" end
  local r = run_logged(ctx, lg, helm_argv(action.verb, action, kubeconfig))
  action.code = r.code
  if not r.ok then
    return nil, string.format("%s: helm %s %s failed (%s)", place.path, action.verb, place.release, cause(r))
  end
  ok, err = run_hooks(ctx, lg, action, "post-" .. action.verb, env)
  if not ok then return nil, err .. " (the release is deployed)" end
  return true
end

local function execute(ctx, action)
  local lg = log.with({hook = ctx.job.hook.name, commit = ctx.job.after:sub(1, 12), plan = action.place.path})
  if action.err then return nil, action.err end
  local kubeconfig, err = kubeconfig_for(ctx, action.place.setup)
  if not kubeconfig then return nil, action.place.path .. ": " .. err end
  lg.info(action.verb .. " " .. action.place.release .. " in namespace " .. action.place.namespace
    .. (action.reason and (" (" .. action.reason .. ")") or ""))
  if action.verb == "uninstall" then return uninstall(ctx, lg, action, kubeconfig) end
  return install_or_upgrade(ctx, lg, action, kubeconfig)
end

-- A plan to deploy from the checkout: the action, with .err when the plan is unusable.
local function deploy_action(job, place, verb, reason)
  local action = {place = place, verb = verb, reason = reason}
  -- the plan file itself may be a symlink: read it only inside the checkout
  local full, err = repo_file(job.checkout, place, "the plan", place.path)
  if not full then action.err = err; return action end
  local text
  text, err = fs.read(full)
  if not text then
    action.err = place.path .. ": cannot read the plan: " .. err
    return action
  end
  action.plan, err = M.parse(text, place.path)
  if not action.plan then action.err = err; return action end
  local ok
  ok, err = identity(place, action.plan)
  if not ok then action.err = err end
  return action
end

-- The commit a removed file was last seen in: the push's before commit, or (for several
-- pushes deployed together, which have no single before) the parent of the commit that
-- removed it.
local function last_seen(job, path)
  if job.before then return job.before end
  local r = proc.run({"git", "--git-dir", job.mirror, "rev-list", "-1", job.after, "--", path},
    {stderr = "ignore"})
  local removed = r and r.ok and r.stdout:match("^(%x+)")
  return removed and (removed .. "^")
end

-- A removed plan, read from the commit before its removal for its release name.
local function uninstall_action(job, place)
  local action = {place = place, verb = "uninstall", plan = {hooks = {}}}
  local rev = last_seen(job, place.path)
  local text = rev and git.show(job.mirror, rev, place.path)
  local plan = text and M.parse(text, place.path)
  if plan then
    action.plan = plan
  else
    log.warn(place.path .. ": the removed plan cannot be read at " .. tostring(rev)
      .. ": uninstalling the release named after its file", {hook = job.hook.name})
  end
  local ok, err = identity(place, plan)
  if not ok then action.err = err end
  return action
end

local function list_for_log(paths)
  local shown = {}
  for i = 1, math.min(#paths, 20) do shown[i] = paths[i] end
  local more = #paths > 20 and string.format(" and %d more", #paths - 20) or ""
  return table.concat(shown, ", ") .. more
end

--- M.actions(job, settings) -> actions (uninstalls first, then the rest, each in path order)
--- action = {place, verb = "install" | "upgrade" | "uninstall", plan, reason, err}
function M.actions(job, settings)
  local size = settings.setup_name_size
  local actions, planned, others = {}, {}, {}
  local lg = log.with({hook = job.hook.name})
  for _, c in ipairs(job.changes) do
    local place, why = M.locate(c.path, size)
    if place then
      planned[c.path] = true
      if c.status == "D" then
        actions[#actions + 1] = uninstall_action(job, place)
      else
        actions[#actions + 1] = deploy_action(job, place, c.status == "A" and "install" or "upgrade")
      end
    else
      others[#others + 1] = {path = c.path, why = why}
    end
  end

  -- a changed file that is not a plan may be the values file of plans that did not change
  if #others > 0 then
    local changed, named = {}, {}
    for _, o in ipairs(others) do changed[o.path] = true end
    for _, a in ipairs(actions) do
      if a.plan and a.plan.values then named[fs.normalize(a.plan.values)] = true end
    end
    for _, f in ipairs(git.changes(job.mirror, nil, job.after)) do
      local place = M.locate(f.path, size)
      if place and not planned[f.path] then
        local full = repo_file(job.checkout, place, "the plan", f.path)
        local text = full and fs.read(full)
        local plan = text and M.parse(text, f.path)
        local values = plan and plan.values and fs.normalize(plan.values)
        if values and changed[values] then
          named[values] = true
          local action = deploy_action(job, place, "upgrade", "its values file " .. values .. " changed")
          actions[#actions + 1] = action
        end
      end
    end
    local short, ignored = {}, {}
    for _, o in ipairs(others) do
      if not named[o.path] then
        if o.why == "short" then short[#short + 1] = o.path else ignored[#ignored + 1] = o.path end
      end
    end
    for _, path in ipairs(short) do
      lg.warn(string.format("%s is not deployed: it is %d path parts deep, and a plan is at "
        .. "<setup: %d parts>/<namespace>/<plan>.yaml (setup_name_size %d): move it, or set "
        .. "plans.setup_name_size / GITOPS_SETUP_NAME_SIZE", path, #split(path), size, size))
    end
    if #ignored > 0 then
      lg.info(string.format("not plans (%d): %s", #ignored, list_for_log(ignored)))
    end
  end

  table.sort(actions, function(a, b)
    local ua, ub = a.verb == "uninstall", b.verb == "uninstall"
    if ua ~= ub then return ua end
    return a.place.path < b.place.path
  end)
  return actions
end

local function summary_line(a)
  local what = a.verb .. " " .. (a.place.release or a.place.name)
  return string.format("%-10s %s  %s", a.status, a.place.path, what)
    .. (a.error and ("\n           " .. a.error) or "")
end

--- M.run(job) -> status ("succeeded" | "failed" | "nothing"), run id
--- job = {hook, checkout, mirror, changes, deliveries, before, after, store, out}, and from
--- opsrun serve also db (its store connection) and env (the environment for children)
function M.run(job)
  local out = job.out or io.stderr
  local lg = log.with({hook = job.hook.name})
  local function start_run(db, paths)
    return history.start_run(db, {
      repo = job.hook.repo, revision = job.after, envs = table.concat(paths, ","),
      args = "commit " .. job.after, trigger = "serve", delivery = table.concat(job.deliveries or {}, ","),
    })
  end
  -- the worker's store connection when there is one (opsrun serve), else one of our own
  local function open_store()
    if job.db then return job.db, function() end end
    local db = history.open(job.store)
    return db, function() db:close() end
  end
  local settings, serr = M.settings(job.hook)
  if not settings then
    lg.error("plans: " .. serr)
    local db, close = open_store()
    local run_id = start_run(db, {})
    history.finish_run(db, run_id, "failed", serr)
    close()
    out:write("plans: " .. serr .. "\n" .. string.format("\nrun %d failed\n", run_id))
    return "failed", run_id
  end
  local actions = M.actions(job, settings)
  if #actions == 0 then
    lg.info("no plan changed: nothing to deploy")
    return "nothing"
  end

  local db, close = open_store()
  local paths = {}
  for i, a in ipairs(actions) do paths[i] = a.place.path end
  local run_id = start_run(db, paths)
  local finished = false
  -- a run whose task is cancelled (opsrun serve stopping) is recorded as interrupted
  local guard <close> = setmetatable({}, {__close = function()
    if not finished then pcall(history.finish_run, db, run_id, "interrupted", "the run was interrupted") end
    close()
  end})
  local function record(a)
    history.record_step(db, run_id, {
      id = a.place.path, env = a.place.setup, tool = "helm", status = a.status, code = a.code,
      started = a.started, finished = a.finished, duration = a.duration,
      error = a.error and log.redact(a.error), log_tail = a.tail and table.concat(a.tail, "\n"),
    })
  end
  for _, a in ipairs(actions) do
    a.status = "pending"
    record(a)
  end

  local tmp <close>, terr = fs.tempdir("opsrun-plans-")
  if not tmp then error("cannot make a working folder: " .. terr .. " (set TMPDIR to a writable folder)", 0) end
  local ctx = {job = job, settings = settings, dir = tmp.path, kubeconfigs = {}, count = 0,
               timeout = (job.hook.deploy or {}).timeout or M.COMMAND_TIMEOUT, env = {}}
  -- the programs run get the worker's environment for children (without the webhook
  -- secrets); the kubeconfig store's credentials are opsrun's, not the repo's scripts'
  for k, v in pairs(job.env or {}) do ctx.env[k] = v end
  for _, name in ipairs(settings.secret_vars) do ctx.env[name] = false end
  local status = "succeeded"
  local ok, err = pcall(function()
    for _, a in ipairs(actions) do
      a.status, a.started, a.tail = "running", time.now(), {}
      record(a)
      ctx.tail = a.tail
      local t0 = time.monotonic()
      local done, why = execute(ctx, a)
      a.finished, a.duration = time.now(), time.monotonic() - t0
      if done then
        a.status = "succeeded"
      else
        a.status, a.error, status = "failed", why, "failed"
        lg.error(why, {plan = a.place.path})
      end
      record(a)
    end
  end)
  finished = true
  if not ok then
    history.finish_run(db, run_id, "failed", log.redact(failure.message(err)))
    error(err, 0)
  end
  history.finish_run(db, run_id, status)
  for _, a in ipairs(actions) do out:write(summary_line(a) .. "\n") end
  out:write(string.format("\nrun %d %s\n", run_id, status))
  return status, run_id
end

return M
