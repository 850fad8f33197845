-- `opsrun deploy` with the real terraform and ansible-playbook (docs/parts/terraform.md,
-- docs/parts/ansible.md): offline Terraform (terraform_data resources, outputs, a local
-- backend whose state lives outside opsrun's temporary working copy) and Ansible against
-- localhost. Each describe needs its tools and says so as pending when one is missing.
-- The exact commands are read from opsrun's own debug log ("running <command>").
local helpers = require "helpers"
local json = require "ops.json"

local function found(program)
  local r = ops.proc.run({"sh", "-c", 'command -v "$1"', "sh", program})
  return r ~= nil and r.ok
end

local HAS_TERRAFORM, HAS_ANSIBLE = found("terraform"), found("ansible-playbook")

-- Variables of the machine that opsrun would read as config (the drivers' export_env names)
-- or that change what the tools print: unset for every run.
local function clean_env(extra)
  local env = {OPSRUN_LOG_FORMAT = "json", OPSRUN_LOG_LEVEL = "debug", NO_COLOR = "1",
               CHECKPOINT_DISABLE = "1", TF_CLI_CONFIG_FILE = false, ANSIBLE_VERBOSITY = false,
               BITOPS_ENVIRONMENT = false, ENVIRONMENT = false}
  for _, tool in ipairs({"terraform", "ansible"}) do
    for _, section in pairs(require("tools." .. tool).schema) do
      for key, spec in pairs(section) do
        if spec.export_env then env[spec.export_env] = false end
        env[("BITOPS_" .. tool .. "_" .. key):upper():gsub("[^%w]", "_")] = false
      end
    end
  end
  for k, v in pairs(extra or {}) do env[k] = v end
  return env
end

local root -- one temp dir for the whole file: repo/, state/, out/, store.db

local function path(rel) return root .. "/" .. rel end

local function write(rel, text)
  assert(ops.fs.mkdir_p(ops.fs.dirname(path(rel))))
  helpers.write(path(rel), (text:gsub("ROOT", root)))
end

-- Runs `opsrun deploy --repo ROOT/repo --env ENV ...`; returns the result with .log (the
-- JSON records of stderr), .commands[step] (what opsrun ran for each step) and .text (all output).
local function deploy(env_name, args, env)
  local argv = {"deploy", "--repo", path("repo"), "--env", env_name}
  for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
  local r = helpers.run_opsrun(argv, {env = clean_env(env), timeout = 180})
  r.log, r.commands = {}, {}
  for line in r.stderr:gmatch("[^\n]+") do
    local rec = json.decode(line)
    if type(rec) == "table" and rec.msg then
      r.log[#r.log + 1] = rec
      local cmd = rec.level == "debug" and rec.msg:match("^running (.*)$")
      if cmd and rec.step then
        r.commands[rec.step] = r.commands[rec.step] or {}
        table.insert(r.commands[rec.step], cmd)
      end
    end
  end
  local msgs = {}
  for _, rec in ipairs(r.log) do msgs[#msgs + 1] = rec.msg end
  r.text = r.stdout .. "\n" .. table.concat(msgs, "\n")
  return r
end

local function succeeded(r)
  assert(r.code == 0, "opsrun deploy failed (exit " .. tostring(r.code) .. "):\n" .. r.text)
end

-- The commands a step ran, without its hooks.
local function tool_commands(r, step)
  local out = {}
  for _, c in ipairs(r.commands[step] or {}) do
    if not c:match("^bash ") then out[#out + 1] = c end
  end
  return out
end

local function state(rel)
  local text = helpers.read(path(rel))
  assert(text, "no state file " .. rel)
  return assert(json.decode(text))
end

local function resources(rel)
  local names = {}
  for _, res in ipairs(state(rel).resources) do names[#names + 1] = res.type .. "." .. res.name end
  table.sort(names)
  return names
end

local MAIN_TF = [[
terraform {
  backend "local" {}
}

variable "name" {
  type    = string
  default = "world"
}

resource "terraform_data" "greeting" {
  input = "hello ${var.name}"
}

resource "terraform_data" "untargeted" {
  input = "only without -target"
}

output "greeting" {
  value = terraform_data.greeting.output
}

# the outputs below depend on the greeting: with -target, terraform updates only those
output "token" {
  value     = "${replace(terraform_data.greeting.output, "hello ", "tok-")}-s3cr3t"
  sensitive = true
}

output "ports" {
  value = terraform_data.greeting.output != "" ? [80, 443] : []
}

output "workspace" {
  value = terraform.workspace
}
]]

local function installed_terraform()
  local r = assert(ops.proc.run({"terraform", "version", "-json"}, {env = clean_env()}))
  return json.decode(r.stdout).terraform_version
end

setup(function()
  root = helpers.tmpdir()
end)

teardown(function() helpers.rmtree(root) end)

-- The its of a describe run in order, each from what the one before left.
describe("opsrun deploy: terraform, then ansible, in one environment", function()
  if not HAS_TERRAFORM then pending("skipped: terraform not found") return end
  if not HAS_ANSIBLE then pending("skipped: ansible-playbook not found") return end

  local version, run
  local tf_config = [[
terraform:
  cli:
    var-file: prod.tfvars
    target:
      - terraform_data.greeting
    backend-config:
      - path=ROOT/state/prod.tfstate
  options:
    stack-action: %s
    version: "%s"
]]

  setup(function()
    version = installed_terraform()
    write("repo/prod/terraform/main.tf", MAIN_TF)
    write("repo/prod/terraform/prod.tfvars", 'name = "prod"\n')
    write("repo/prod/terraform/bitops.config.yaml", tf_config:format("apply", version))
    write("repo/prod/terraform/bitops.after-deploy.d/10-outputs.sh",
      'printf %s "$TF_OUTPUT_GREETING" > ROOT/out/terraform-hook.txt\n')
    write("repo/prod/ansible/playbook.yaml", [[
- hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: write what terraform gave
      copy:
        dest: ROOT/out/ansible.txt
        content: "{{ lookup('env', 'TF_OUTPUT_GREETING') }} {{ lookup('env', 'TF_OUTPUT_PORTS') }}"
]])
    write("repo/prod/ansible/bitops.after-deploy.d/10-outputs.sh",
      'printf %s "$TF_OUTPUT_GREETING $TF_OUTPUT_TOKEN" > ROOT/out/ansible-hook.txt\n'
      .. 'echo "the token is $TF_OUTPUT_TOKEN"\n')
    assert(ops.fs.mkdir_p(path("out")))
  end)

  it("apply: checks the version, inits the backend, plans, applies and reads the outputs", function()
    run = deploy("prod")
    succeeded(run)
    local plan_flags = " -var-file=prod.tfvars -target=terraform_data.greeting"
    assert.are.same({
      "terraform version -json",
      "terraform init -input=false -backend-config=path=" .. path("state/prod.tfstate"),
      "terraform plan -input=false" .. plan_flags,
      "terraform apply -input=false -auto-approve" .. plan_flags,
      "terraform output -json",
    }, tool_commands(run, "prod/terraform"))
    assert.are.same({"ansible-playbook playbook.yaml"}, tool_commands(run, "prod/ansible"))
  end)

  it("leaves the state in the backend's path, with the targeted resource and the outputs", function()
    assert.are.same({"terraform_data.greeting"}, resources("state/prod.tfstate"))
    local outputs = state("state/prod.tfstate").outputs
    assert.are.equal("hello prod", outputs.greeting.value)
    assert.are.same({80, 443}, outputs.ports.value)
    assert.is_true(outputs.token.sensitive)
  end)

  it("gives TF_OUTPUT_<NAME> to the later ansible step's playbook", function()
    assert.are.equal("hello prod [80,443]", helpers.read(path("out/ansible.txt")))
  end)

  it("gives them to the terraform step's after-hooks and the later step's after-hooks", function()
    assert.are.equal("hello prod", helpers.read(path("out/terraform-hook.txt")))
    assert.are.equal("hello prod tok-prod-s3cr3t", helpers.read(path("out/ansible-hook.txt")))
  end)

  it("masks a sensitive output in everything opsrun prints", function()
    assert.truthy(run.text:find("the token is ***", 1, true), run.text)
    assert.falsy(run.text:find("s3cr3t", 1, true))
    assert.falsy(run.stderr:find("s3cr3t", 1, true))
  end)

  it("destroy: plans the destruction, destroys, and leaves the state empty", function()
    write("repo/prod/terraform/bitops.config.yaml", tf_config:format("destroy", version))
    local r = deploy("prod")
    succeeded(r)
    local plan_flags = " -var-file=prod.tfvars -target=terraform_data.greeting"
    assert.are.same({
      "terraform version -json",
      "terraform init -input=false -backend-config=path=" .. path("state/prod.tfstate"),
      "terraform plan -input=false -destroy" .. plan_flags,
      "terraform destroy -input=false -auto-approve" .. plan_flags,
    }, tool_commands(r, "prod/terraform"))
    assert.truthy(r.text:find("1 to destroy", 1, true))
    assert.are.same({}, resources("state/prod.tfstate"))
    -- no outputs are read after a destroy: the later step sees none
    assert.are.equal(" ", helpers.read(path("out/ansible.txt")))
  end)
end)

describe("opsrun deploy: terraform", function()
  if not HAS_TERRAFORM then pending("skipped: terraform not found") return end

  local ws_config = [[
terraform:
  cli:
    backend-config:
      - path=ROOT/state/ws.tfstate
      - workspace_dir=ROOT/state/workspaces
  options:
    stack-action: apply
    workspace: feature-x
]]

  local function ws_commands(...)
    local list = {"terraform init -input=false -backend-config=path=" .. path("state/ws.tfstate")
      .. " -backend-config=workspace_dir=" .. path("state/workspaces")}
    for _, c in ipairs({...}) do list[#list + 1] = c end
    return list
  end

  setup(function()
    write("repo/ws/terraform/main.tf", MAIN_TF)
    write("repo/ws/terraform/bitops.config.yaml", ws_config)
  end)

  it("creates the workspace with `workspace new` when select finds none", function()
    local r = deploy("ws")
    succeeded(r)
    assert.are.same(ws_commands("terraform workspace select feature-x", "terraform workspace new feature-x",
      "terraform plan -input=false", "terraform apply -input=false -auto-approve", "terraform output -json"),
      tool_commands(r, "ws/terraform"))
    local ws_state = "state/workspaces/feature-x/terraform.tfstate"
    assert.are.same({"terraform_data.greeting", "terraform_data.untargeted"}, resources(ws_state))
    assert.are.equal("feature-x", state(ws_state).outputs.workspace.value)
    -- the default workspace's state, if terraform wrote one, holds nothing
    if ops.fs.exists(path("state/ws.tfstate")) then assert.are.same({}, resources("state/ws.tfstate")) end
  end)

  it("selects it on the next run, and finds nothing to change there", function()
    local r = deploy("ws")
    succeeded(r)
    assert.are.same(ws_commands("terraform workspace select feature-x", "terraform plan -input=false",
      "terraform apply -input=false -auto-approve", "terraform output -json"), tool_commands(r, "ws/terraform"))
    assert.truthy(r.text:find("Resources: 0 added, 0 changed, 0 destroyed", 1, true), r.text)
  end)

  it("fails the step before init when options.version does not match the installed terraform", function()
    write("repo/ws/terraform/bitops.config.yaml", ws_config .. '    version: "0.11"\n')
    local r = deploy("ws")
    assert.are.equal(1, r.code)
    assert.are.same({"terraform version -json"}, tool_commands(r, "ws/terraform"))
    local msg = "terraform " .. installed_terraform() .. " is installed, but options.version asks for 0.11 "
      .. "(ws/terraform/bitops.config.yaml): put terraform 0.11 first on PATH, or change options.version"
    assert.truthy(r.stdout:find("ws/terraform failed: " .. msg, 1, true), r.stdout)
  end)
end)

describe("opsrun deploy: what the environment reaches outside its folder, as in BitOps", function()
  if not HAS_TERRAFORM then pending("skipped: terraform not found") return end

  setup(function()
    -- a module beside the environments, reached by a relative path; its apply writes into
    -- its own folder (as an archive_file or a local-exec may)
    write("repo/modules/greet/main.tf", [[
resource "terraform_data" "hello" {
  input = "hello from the module"
  provisioner "local-exec" {
    command = "echo written > ${path.module}/written-by-apply.txt"
  }
}
]])
    write("repo/top.txt", "a file at the top of the repo\n")
    write("repo/modular/terraform/main.tf", [[
terraform {
  backend "local" {}
}
module "greet" {
  source = "../../modules/greet"
}
]])
    write("repo/modular/terraform/bitops.config.yaml",
      "terraform:\n  cli:\n    backend-config:\n      - path=ROOT/state/modular.tfstate\n  options:\n    stack-action: apply\n")
    write("repo/modular/terraform/bitops.before-deploy.d/01-look.sh",
      'ls "$OPSRUN_WORKDIR" > ROOT/out/modular-workdir.txt\ncat ../../top.txt > ROOT/out/modular-top.txt\n'
      .. 'ls ../../modules/greet > ROOT/out/modular-module.txt\n')
    assert(ops.fs.mkdir_p(path("out")))
  end)

  it("has the repo's other folders and files in its working copy, but not the other environments", function()
    local r = deploy("modular")
    succeeded(r)
    assert.are.same({"module.greet.terraform_data.hello"}, (function()
      local names = {}
      for _, res in ipairs(state("state/modular.tfstate").resources) do
        names[#names + 1] = res.module .. "." .. res.type .. "." .. res.name
      end
      return names
    end)())
    -- prod, cfg, ws, full: environments of their own (a tool folder), left out
    assert.are.equal("modular\nmodules\ntop.txt\n", helpers.read(path("out/modular-workdir.txt")))
    assert.are.equal("a file at the top of the repo\n", helpers.read(path("out/modular-top.txt")))
    -- what the module wrote went into the working copy, not the repo
    assert.is_false(ops.fs.exists(path("repo/modules/greet/written-by-apply.txt")))
    -- and it is not kept for the next run either: that one starts from the repo's files
    assert.are.equal("main.tf\n", helpers.read(path("out/modular-module.txt")))
    r = deploy("modular")
    succeeded(r)
    assert.are.equal("modular\nmodules\ntop.txt\n", helpers.read(path("out/modular-workdir.txt")))
    assert.are.equal("main.tf\n", helpers.read(path("out/modular-module.txt")))
  end)
end)

describe("opsrun deploy: ansible", function()
  if not HAS_ANSIBLE then pending("skipped: ansible-playbook not found") return end

  local config = [[
ansible:
  cli:
    extra-vars:
      - out=ROOT/out/%s
%s
]]

  local function configure(out, more)
    assert(ops.fs.mkdir_p(path("out/" .. out)))
    write("repo/cfg/ansible/bitops.config.yaml", config:format(out, more or ""))
  end

  local function files(out)
    local names = assert(ops.fs.list(path("out/" .. out)))
    local got = {}
    for _, n in ipairs(names) do got[n] = helpers.read(path("out/" .. out .. "/" .. n)) end
    return got
  end

  setup(function()
    write("repo/cfg/ansible/playbook.yaml", [[
- hosts: localhost
  connection: local
  gather_facts: false
  vars:
    greeting: from-the-playbook
  tasks:
    - name: web
      copy: {dest: "{{ out }}/web.txt", content: "{{ greeting }}"}
      tags: [web]
    - name: db
      copy: {dest: "{{ out }}/db.txt", content: "db"}
      tags: [db]
    - name: env
      copy:
        dest: "{{ out }}/env.txt"
        content: "{{ lookup('env', 'FROM_EXTRA_ENV') }}|{{ lookup('env', 'QUOTED') }}|{{ ansible_verbosity }}"
      tags: [env]
]])
    -- a vars file next to the playbook: ansible-playbook would fail on it if it were run
    write("repo/cfg/ansible/vars.yml", "db_port: 5432\n")
    write("repo/cfg/ansible/extra_env", '# for the playbook\nexport FROM_EXTRA_ENV=extra\nQUOTED="a b # c"\n')
  end)

  it("--tags and --extra-vars: only the tagged tasks run, with the given variables", function()
    configure("tags", "      - greeting=from-extra-vars\n    tags: web,env\n  options:\n    verbosity: 1")
    local r = deploy("cfg")
    succeeded(r)
    assert.are.same({"ansible-playbook playbook.yaml --extra-vars out=" .. path("out/tags")
      .. " --extra-vars greeting=from-extra-vars --tags web,env"}, tool_commands(r, "cfg/ansible"))
    assert.are.same({["web.txt"] = "from-extra-vars", ["env.txt"] = "extra|a b # c|1"}, files("tags"))
  end)

  it("--skip-tags: every task but the skipped ones; ANSIBLE_VERBOSITY passes through as it is", function()
    configure("skip", "    skip-tags: web")
    local r = deploy("cfg", nil, {ANSIBLE_VERBOSITY = "2"})
    succeeded(r)
    assert.are.same({"ansible-playbook playbook.yaml --extra-vars out=" .. path("out/skip")
      .. " --skip-tags web"}, tool_commands(r, "cfg/ansible"))
    assert.are.same({["db.txt"] = "db", ["env.txt"] = "extra|a b # c|2"}, files("skip"))
  end)

  it("options.dryrun: --check, and the playbook changes nothing", function()
    configure("check", "  options:\n    dryrun: true")
    local r = deploy("cfg")
    succeeded(r)
    assert.are.same({"ansible-playbook playbook.yaml --extra-vars out=" .. path("out/check") .. " --check"},
      tool_commands(r, "cfg/ansible"))
    assert.are.same({}, files("check"))
  end)

  it("fails the step with ansible-playbook's exit when a task fails", function()
    configure("fail", "    tags: db")
    write("repo/cfg/ansible/playbook.yaml", "- hosts: localhost\n  connection: local\n  gather_facts: false\n"
      .. "  tasks:\n    - fail: {msg: planned failure}\n      tags: [db]\n")
    local r = deploy("cfg")
    assert.are.equal(1, r.code)
    assert.truthy(r.stdout:find("cfg/ansible failed: ansible-playbook playbook.yaml failed: it exited with 2",
      1, true), r.stdout)
  end)
end)

-- No tool runs in a dry run, so these need neither terraform nor ansible-playbook.
describe("opsrun deploy --dry-run: the exact commands of a full BitOps config", function()
  setup(function()
    write("repo/full/terraform/bitops.config.yaml", [[
terraform:
  cli:
    var-file:
      - common.tfvars
      - full.tfvars
    target:
      - module.vpc
      - terraform_data.a
    backend-config:
      - bucket=tf-state
      - key=full/terraform.tfstate
    upgrade: true
    stack-action: apply
  options:
    workspace: blue
    version: "0.1"
]])
    write("repo/full/ansible/site.yaml", "- hosts: all\n  tasks: []\n")
    write("repo/full/ansible/db.yml", "- hosts: db\n  tasks: []\n")
    write("repo/full/ansible/extra_env", "APP_ENV=full\n")
    write("repo/full/ansible/bitops.config.yaml", [[
ansible:
  cli:
    main-playbook:
      - site.yaml
      - db.yml
    inventory: inventory.ini
    extra-vars:
      - "@vars.json"
      - release=42
    tags: deploy
    skip-tags: slow
    forks: 10
    flush-cache: true
    force-handlers: true
  options:
    dryrun: true
    verbosity: 3
]])
  end)

  local function would_run(stdout, step)
    local out = {}
    for cmd in stdout:gmatch("%[" .. step:gsub("%p", "%%%0") .. "%] would run: ([^\n]*)") do out[#out + 1] = cmd end
    return out
  end

  it("prints each command of both steps, in order, and runs none", function()
    local r = deploy("full", {"--dry-run"}, {PATH = "/usr/bin:/bin"}) -- no terraform on PATH needed
    succeeded(r)
    local tf_flags = " -var-file=common.tfvars -var-file=full.tfvars -target=module.vpc -target=terraform_data.a"
    assert.are.same({
      "terraform init -input=false -upgrade -backend-config=bucket=tf-state "
        .. "-backend-config=key=full/terraform.tfstate",
      "terraform workspace select blue",
      "terraform plan -input=false" .. tf_flags,
      "terraform apply -input=false -auto-approve" .. tf_flags,
      "terraform output -json",
    }, would_run(r.stdout, "full/terraform"))
    local flags = " --inventory inventory.ini --extra-vars @vars.json --extra-vars release=42 --tags deploy"
      .. " --skip-tags slow --forks 10 --flush-cache --force-handlers --check"
    assert.are.same({"ansible-playbook site.yaml" .. flags, "ansible-playbook db.yml" .. flags},
      would_run(r.stdout, "full/ansible"))
    assert.truthy(r.stdout:find("dry run: nothing was run", 1, true))
  end)

  it("shows the variables each command gets: the exported config, extra_env, ANSIBLE_VERBOSITY", function()
    local r = deploy("full", {"--dry-run"})
    succeeded(r)
    local site = r.stdout:match("%[full/ansible%] would run: ansible%-playbook site%.yaml[^\n]*\n(.-\n)%[")
    assert.truthy(site, r.stdout)
    for _, line in ipairs({"env: ANSIBLE_VERBOSITY=3", "env: APP_ENV=full", "env: ANSIBLE_TAGS=deploy",
                           "env: ANSIBLE_DRYRUN=true", "env: ANSIBLE_MAIN_SCRIPT=site.yaml,db.yml"}) do
      assert.truthy(site:find(line .. "\n", 1, true), line .. " not in:\n" .. site)
    end
    local tf = r.stdout:match("%[full/terraform%] would run: terraform init[^\n]*\n(.-\n)%[")
    for _, line in ipairs({"env: TERRAFORM_WORKSPACE=blue", "env: TF_VAR_FILE=common.tfvars,full.tfvars",
                           "env: TERRAFORM_COMMAND=apply", "env: TERRAFORM_INIT_UPGRADE=true"}) do
      assert.truthy(tf:find(line .. "\n", 1, true), line .. " not in:\n" .. tf)
    end
  end)
end)
