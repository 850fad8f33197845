-- The Helm driver: deploys every chart folder of a helm step with `helm upgrade --install`,
-- and rolls a release back to its last good revision when that fails.
-- The reference for users is docs/parts/helm.md; the contract is docs/drivers.md.
local fs = require "ops.fs"
local yaml = require "ops.yaml"
local json = require "ops.json"
local crypto = require "ops.crypto"

local M = {}

-- Based on bitops-plugins/helm bitops.schema.yaml; the differences are in docs/parts/helm.md.
M.schema = {
  cli = {
    namespace = {type = "string", required = true, export_env = "NAMESPACE"},
    timeout = {type = "string", default = "500s", export_env = "TIMEOUT"},
    set = {type = "list", export_env = "HELM_SET_FLAG"},
    debug = {type = "boolean", export_env = "HELM_DEBUG"},
    atomic = {type = "boolean"},
    force = {type = "boolean"},
    ["dry-run"] = {type = "boolean"},
  },
  options = {
    ["skip-deploy"] = {type = "boolean", export_env = "HELM_SKIP_DEPLOY"},
    ["release-name"] = {type = "string", export_env = "HELM_RELEASE_NAME"},
    ["default-root-dir"] = {type = "string", default = "_default", export_env = "DEFAULT_ROOT_DIR"},
    ["default-sub-dir"] = {type = "string", export_env = "DEFAULT_SUB_DIR"},
    uninstall = {type = "boolean", export_env = "HELM_UNINSTALL"},
    k8s = {type = "object", properties = {
      kubeconfigpath = {type = "string", export_env = "KUBE_CONFIG_PATH"},
      fetch = {type = "object", properties = {
        kubeconfig = {type = "boolean", export_env = "FETCH_KUBECONFIG"},
        ["cluster-name"] = {type = "string", export_env = "CLUSTER_NAME"},
      }},
    }},
  },
}

-- The chart a failed upgrade was deploying, per step, for recover().
local upgrading = setmetatable({}, {__mode = "k"})

-- A config value, with YAML null and "" meaning absent.
local function present(v)
  if v == nil or v == yaml.null or v == "" then return nil end
  return v
end

-- A variable of the step, else of opsrun's environment.
local function env(step, name)
  local v = step.vars[name]
  if v == nil then v = os.getenv(name) end
  return present(v)
end

local function truthy(v)
  if type(v) == "string" then v = v:lower() end
  return v == true or v == "true" or v == "1" or v == "yes"
end

local function options(step) return step.config.options or {} end
local function cli(step) return step.config.cli or {} end

local function k8s(step)
  local k = present(options(step).k8s) or {}
  return k, present(k.fetch) or {}
end

-- A path for messages: relative to the working copy, as the user knows it from the repo.
local function is_file(path)
  return fs.type(path) == "file"
end

local function is_dir(path)
  return fs.type(path) == "directory"
end

local function message_of(err)
  if type(err) == "table" then return tostring(err.message) end
  return tostring(err)
end

-- The flags every command that talks to the cluster gets.
local function cluster_flags(argv, chart)
  argv[#argv + 1] = "--namespace"
  argv[#argv + 1] = chart.namespace
  if chart.kubeconfig then
    argv[#argv + 1] = "--kubeconfig"
    argv[#argv + 1] = chart.kubeconfig
  end
  return argv
end

--- kubeconfig(step) -> path | nil: the kubeconfig helm is given (--kubeconfig), in this
-- order: BITOPS_KUBECONFIG_BASE64, options.k8s.kubeconfigpath / KUBE_CONFIG_PATH, a fetch
-- with `aws eks update-kubeconfig`; nil leaves helm to its own default (KUBECONFIG, ~/.kube).
-- The base64 variable `var`, decoded into the step's private file `name` (never logged).
-- The decoded text and every string in it (a YAML document: values, a kubeconfig's
-- tokens and keys) are registered as secrets: helm --debug or --dry-run prints them.
local function register_secrets(step, data)
  step:secret(data)
  local doc = yaml.load(data, "secret")
  local function walk(t, depth)
    if depth > 32 then return end
    for _, v in pairs(t) do
      if type(v) == "table" then walk(v, depth + 1)
      elseif type(v) == "string" then step:secret(v) end
    end
  end
  if type(doc) == "table" then walk(doc, 0) end
end

local function decoded_file(step, var, name, original)
  local data, err = crypto.base64_decode(env(step, var))
  if not data then
    step:fail(string.format("%s is not valid base64 (%s): set it to the output of `base64 -w0 %s`",
      var, err, original))
  end
  register_secrets(step, data)
  return step:private_file(name, data)
end

function M:kubeconfig(step)
  if env(step, "BITOPS_KUBECONFIG_BASE64") then
    step.log.info("kubeconfig: from BITOPS_KUBECONFIG_BASE64")
    return decoded_file(step, "BITOPS_KUBECONFIG_BASE64", "kubeconfig", "kubeconfig")
  end

  local k, fetch = k8s(step)
  local path = present(k.kubeconfigpath) or env(step, "KUBE_CONFIG_PATH")
  if path then
    local full = path:sub(1, 1) == "/" and path or fs.join(step.dir, path)
    if not is_file(full) then
      step:fail(string.format("options.k8s.kubeconfigpath (or KUBE_CONFIG_PATH) is %s, but there "
        .. "is no such file (%s): give the path of a kubeconfig file, relative to %s or absolute",
        path, step.config_file, step:shown(step.dir)))
    end
    step.log.info("kubeconfig: " .. path)
    return full
  end

  local cluster = present(fetch["cluster-name"])
  local wanted = present(fetch.kubeconfig)
  if wanted == nil then wanted = cluster ~= nil end
  if not truthy(wanted) then return nil end
  if not cluster then
    step:fail(string.format("options.k8s.fetch.cluster-name is required when "
      .. "options.k8s.fetch.kubeconfig is true (%s): name the EKS cluster to fetch the "
      .. "kubeconfig of", step.config_file))
  end
  local file = step:private_file("kubeconfig", "")
  step:check({"aws", "eks", "update-kubeconfig", "--name", cluster, "--kubeconfig", file})
  step.log.info("kubeconfig: fetched for EKS cluster " .. cluster)
  return file
end

local function read_chart_yaml(step, dir)
  local file = fs.join(dir, "Chart.yaml")
  local meta, err = yaml.load_file(file)
  if not meta then step:fail("cannot read the chart: " .. err) end
  if type(meta) ~= "table" then
    step:fail(step:shown(file)
      .. ": a Chart.yaml must be a mapping (apiVersion, name, version, …)")
  end
  return meta
end

local function chart_folders(step)
  local names = {}
  local wanted = env(step, "BITOPS_ENVIRONMENT_HELM_SUBDIRECTORY")
  if wanted then
    if wanted:find("/", 1, true) or wanted == ".."
        or not is_file(fs.join(step.dir, wanted, "Chart.yaml")) then
      step:fail(string.format("BITOPS_ENVIRONMENT_HELM_SUBDIRECTORY is %s, but %s has no "
        .. "Chart.yaml: name one chart folder of %s", wanted,
        step:shown(fs.join(step.dir, wanted)), step:shown(step.dir)))
    end
    return {wanted}
  end
  local skip = present(options(step)["default-root-dir"]) or "_default"
  for _, name in ipairs(assert(fs.list(step.dir))) do
    local dir = fs.join(step.dir, name)
    if name ~= skip and name:sub(1, 1) ~= "." and is_dir(dir)
        and is_file(fs.join(dir, "Chart.yaml")) then
      names[#names + 1] = name
    end
  end
  return names
end

local function check_release_name(step, name, origin)
  if #name > 53 or not (name:match("^[a-z0-9][-a-z0-9.]*$") and name:match("[a-z0-9]$"))
      or name:find("..", 1, true) or name:find("%.%-") or name:find("%-%.") then
    step:fail(string.format("release name %q (%s) is not a valid Helm release name: lowercase "
      .. "letters, digits, '-' and '.', starting and ending with a letter or digit, at most 53 "
      .. "characters; set options.release-name in %s", name, origin, step.config_file))
  end
end

--- charts(step) -> {chart, ...}: the charts to deploy, in order. A chart is
-- {name = folder, dir = absolute path, meta = Chart.yaml, release = , namespace = }.
-- step.dir itself when it has a Chart.yaml; else its subfolders with a Chart.yaml,
-- alphabetically (or only BITOPS_ENVIRONMENT_HELM_SUBDIRECTORY).
function M:charts(step)
  local namespace = present(cli(step).namespace)
  if not namespace then
    step:fail(string.format("cli.namespace is required (%s): the Kubernetes namespace the "
      .. "releases go to", step.config_file))
  end
  local release_name = present(options(step)["release-name"])

  local found
  if is_file(fs.join(step.dir, "Chart.yaml")) then
    found = {{name = step.folder, dir = step.dir}}
  else
    found = {}
    for _, name in ipairs(chart_folders(step)) do
      found[#found + 1] = {name = name, dir = fs.join(step.dir, name)}
    end
  end

  if release_name and #found > 1 then
    local names = {}
    for i, c in ipairs(found) do names[i] = c.name end
    step:fail(string.format("options.release-name (%s) names one release, but %s has %d charts "
      .. "(%s) (%s): remove it to name each release after its chart folder, or deploy one chart "
      .. "with BITOPS_ENVIRONMENT_HELM_SUBDIRECTORY", release_name, step:shown(step.dir), #found,
      table.concat(names, ", "), step.config_file))
  end

  for _, chart in ipairs(found) do
    chart.meta = read_chart_yaml(step, chart.dir)
    chart.namespace = namespace
    chart.release = release_name or chart.name
    check_release_name(step, chart.release,
      release_name and "options.release-name" or "the chart folder's name")
  end
  if #found == 0 then
    step.log.warn("no chart folder in " .. step:shown(step.dir)
      .. " (a chart folder is a subfolder with a Chart.yaml): nothing to deploy")
  end
  return found
end

--- dependencies(step, chart): `helm dependency update` when the chart declares dependencies
-- (Chart.yaml `dependencies:`, or a Helm 2 style requirements.yaml).
function M:dependencies(step, chart)
  local deps = present(chart.meta.dependencies)
  local declared = type(deps) == "table" and next(deps) ~= nil
  if not declared and not is_file(fs.join(chart.dir, "requirements.yaml")) then return end
  step:check({"helm", "dependency", "update", chart.dir})
end

--- values(step, chart) -> {file, ...}: the values files, lowest precedence first, each only
-- if it exists: the _default chart's values.yaml, values.yaml, values-versions.yaml,
-- values-secrets.yaml (from HELM_SECRETS_BASE64 when set), values-files/* by name.
function M:values(step, chart)
  local files = {}
  -- every values file stays inside the working copy: no `..` in the options, no symlink out
  local function add(path)
    if not fs.lstat(path) then return end
    local _, _, code = fs.within(step.workdir, path)
    if code == "EOUTSIDE" then
      step:fail(string.format("%s leads outside the working copy (options.default-root-dir, "
        .. "options.default-sub-dir, or a symlink): give a path inside the repo (%s)", step:shown(path),
        step.config_file))
    end
    if is_file(path) then files[#files + 1] = path end
  end

  local opts = options(step)
  local sub = present(opts["default-sub-dir"]) or fs.join(step.folder, chart.name)
  add(fs.join(step.workdir, present(opts["default-root-dir"]) or "_default", sub, "values.yaml"))
  add(fs.join(chart.dir, "values.yaml"))
  add(fs.join(chart.dir, "values-versions.yaml"))

  if env(step, "HELM_SECRETS_BASE64") then
    files[#files + 1] = decoded_file(step, "HELM_SECRETS_BASE64",
      "helm-" .. chart.name .. "-values-secrets.yaml", "values-secrets.yaml")
  else
    add(fs.join(chart.dir, "values-secrets.yaml"))
  end

  local extra = fs.join(chart.dir, "values-files")
  if is_dir(extra) then
    for _, name in ipairs(assert(fs.list(extra))) do
      if name:sub(1, 1) ~= "." then add(fs.join(extra, name)) end
    end
  end
  return files
end

local function set_list(step)
  local set = present(cli(step).set)
  if set == nil then return {} end
  if type(set) ~= "table" then set = {set} end
  for i, item in ipairs(set) do
    if type(item) ~= "string" or not item:find("=", 1, true) then
      step:fail(string.format("cli.set[%d] is %s, not key=value (%s)", i, tostring(item),
        step.config_file))
    end
  end
  return set
end

--- upgrade(step, chart): `helm upgrade --install` of chart.release from chart.dir.
function M:upgrade(step, chart)
  local c = cli(step)
  local argv = {"helm", "upgrade", chart.release, chart.dir, "--install",
                "--namespace", chart.namespace, "--create-namespace",
                "--timeout", tostring(present(c.timeout) or "500s")}
  for _, flag in ipairs({"atomic", "debug", "force", "dry-run"}) do
    if truthy(present(c[flag])) then argv[#argv + 1] = "--" .. flag end
  end
  for _, kv in ipairs(set_list(step)) do
    argv[#argv + 1] = "--set"
    argv[#argv + 1] = kv
  end
  for _, file in ipairs(chart.values or {}) do
    argv[#argv + 1] = "-f"
    argv[#argv + 1] = file
  end
  if chart.kubeconfig then
    argv[#argv + 1] = "--kubeconfig"
    argv[#argv + 1] = chart.kubeconfig
  end
  step:check(argv)
end

--- rollback(step, chart, revision): `helm rollback` to that revision.
function M:rollback(step, chart, revision)
  step:check(cluster_flags({"helm", "rollback", chart.release, tostring(revision),
    "--timeout", tostring(present(cli(step).timeout) or "500s")}, chart))
end

--- uninstall(step, chart): `helm uninstall`; a release that is not installed is not an error.
function M:uninstall(step, chart)
  local r = step:run(cluster_flags({"helm", "uninstall", chart.release}, chart))
  if r.ok then return end
  if (r.stderr or ""):find("not found", 1, true) then
    step.log.info("release " .. chart.release .. " is not installed: nothing to uninstall")
    return
  end
  step:fail(string.format("helm uninstall failed (exit %s): %s", tostring(r.code), r.stderr or ""))
end

local function uninstalling(step, chart)
  if truthy(present(options(step).uninstall) or env(step, "HELM_UNINSTALL")) then return true end
  for name in (env(step, "HELM_UNINSTALL_CHARTS") or ""):gmatch("[^,%s]+") do
    if name == chart.release then return true end
  end
  return false
end

--- deploy(step): every chart in order, stopping at the first failure.
-- (options.skip-deploy never gets here: the engine skips the step before its driver runs)
function M:deploy(step)
  local charts = self:charts(step)
  if #charts == 0 then return end
  local kubeconfig = self:kubeconfig(step)
  for _, chart in ipairs(charts) do
    chart.kubeconfig = kubeconfig
    if uninstalling(step, chart) then
      step.log.info("uninstalling release " .. chart.release)
      self:uninstall(step, chart)
    else
      self:dependencies(step, chart)
      chart.values = self:values(step, chart)
      upgrading[step] = chart
      self:upgrade(step, chart)
      upgrading[step] = nil
    end
  end
end

local function history(step, chart)
  local r = step:run(cluster_flags({"helm", "history", chart.release, "-o", "json"}, chart),
    {quiet = true})
  if not r.ok then
    if (r.stderr or ""):find("release: not found", 1, true) then return {} end
    return nil, string.format("helm history failed (exit %s): %s", tostring(r.code), r.stderr or "")
  end
  local revisions, err = json.decode(r.stdout, "helm history")
  if type(revisions) ~= "table" then return nil, "cannot read helm history: " .. tostring(err) end
  table.sort(revisions, function(a, b) return a.revision < b.revision end)
  return revisions
end

--- recover(step, err): after a failed upgrade, back to the last good revision: the newest
-- "deployed" or "superseded" one before the failed one; none (a first install failed):
-- uninstall. Nothing when the newest revision is deployed (--atomic already rolled back) or
-- the release is gone. Its own failures are logged, never raised over the original error.
function M:recover(step, err)
  local chart = upgrading[step]
  upgrading[step] = nil
  if not chart then return end
  if truthy(present(cli(step)["dry-run"])) then return end
  local revisions, herr = history(step, chart)
  if not revisions then
    step.log.error("cannot roll back release " .. chart.release .. ": " .. herr)
    return
  end
  local last = revisions[#revisions]
  if not last then
    step.log.info("release " .. chart.release .. " does not exist: nothing to roll back")
    return
  end
  if last.status == "deployed" then
    step.log.info(string.format("release %s is at revision %d (deployed): nothing to roll back",
      chart.release, last.revision))
    return
  end
  local good
  for i = #revisions - 1, 1, -1 do
    if revisions[i].status == "deployed" or revisions[i].status == "superseded" then
      good = revisions[i]
      break
    end
  end
  local ok, rerr
  if good then
    step.log.warn(string.format("upgrade of %s failed (%s): rolling back to revision %d",
      chart.release, message_of(err), good.revision))
    ok, rerr = pcall(self.rollback, self, step, chart, good.revision)
  else
    step.log.warn(string.format("upgrade of %s failed (%s) and no revision of it was ever "
      .. "deployed: uninstalling it", chart.release, message_of(err)))
    ok, rerr = pcall(self.uninstall, self, step, chart)
  end
  if not ok then
    step.log.error("recovery of release " .. chart.release .. " failed: " .. message_of(rerr))
  end
end

return M
