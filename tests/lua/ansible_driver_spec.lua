-- The Ansible driver (lua/tools/ansible.lua) against docs/parts/ansible.md: which playbooks
-- run, and the exact ansible-playbook command for every BitOps option, with the fake step in
-- a real folder. Real runs of ansible-playbook through `opsrun deploy` are in
-- deploy_tools_spec.lua.
local helpers = require "helpers"
local fake_step = require "fake_step"
local ansible = require "tools.ansible"

local PLAY = "- hosts: localhost\n  gather_facts: false\n  tasks: []\n"

local dir

local function write(name, text)
  local parent = name:match("^(.*)/[^/]+$")
  if parent then assert(ops.fs.mkdir_p(dir .. "/" .. parent)) end
  helpers.write(dir .. "/" .. name, text)
end

local function step_with(o)
  o = o or {}
  return fake_step.new{tool = "ansible", dir = dir, config = {cli = o.cli or {}, options = o.options or {}},
                       vars = o.vars, results = o.results}
end

-- The failure the driver raised through step:fail, as the user sees it.
local function failure(step)
  local ok, e = pcall(ansible.deploy, ansible, step)
  assert.is_false(ok, "expected the step to fail")
  assert.is_true(type(e) == "table" and e.step_failure, "not a step failure: " .. tostring(e))
  return e.message
end

local function deployed(o)
  local step = step_with(o)
  ansible:deploy(step)
  return step
end

before_each(function()
  dir = helpers.tmpdir()
  write("playbook.yaml", PLAY)
end)

after_each(function() helpers.rmtree(dir) end)

describe("ansible driver: which playbooks run", function()
  it("runs every playbook of the folder, .yaml and .yml, in name order", function()
    write("site.yml", PLAY)
    write("10-base.yaml", PLAY)
    write("Zeta.yaml", PLAY) -- byte order: upper case first
    local step = deployed()
    assert.are.same({"ansible-playbook 10-base.yaml", "ansible-playbook Zeta.yaml",
                     "ansible-playbook playbook.yaml", "ansible-playbook site.yml"}, step.commands)
  end)

  it("counts only YAML lists of plays: not bitops.config.yaml, vars, inventories or requirements", function()
    write("bitops.config.yaml", "ansible:\n  cli:\n    tags: web\n")
    write("bitops.config.yml", "- hosts: all\n") -- never a playbook, whatever it holds
    write("vars.yaml", "db_port: 5432\nusers: [a, b]\n")
    write("list-vars.yml", "- one\n- two\n")
    write("inventory.yaml", "all:\n  hosts:\n    localhost:\n")
    write("requirements.yml", "- src: geerlingguy.nginx\n  version: 3.1.0\n")
    write("empty.yaml", "")
    write(".hidden.yaml", PLAY)
    write("imports.yaml", "- import_playbook: playbook.yaml\n- ansible.builtin.import_playbook: x.yml\n")
    write("notes.txt", PLAY)
    write("group_vars/all.yaml", PLAY) -- only the folder itself is searched
    write("roles.yaml/keep", "a folder named like a playbook")
    local step = deployed()
    assert.are.same({"ansible-playbook imports.yaml", "ansible-playbook playbook.yaml"}, step.commands)
  end)

  it("fails naming a top-level .yaml file that is not valid YAML, rather than skip it", function()
    write("site.yaml", "- hosts: [localhost\n")
    local msg = failure(step_with())
    assert.truthy(msg:find("^test/ansible/site.yaml is not valid YAML: .*site.yaml:2:"), msg)
    assert.truthy(msg:find("(fix it, or name the playbooks to run in cli.main-playbook)", 1, true), msg)
  end)

  it("fails when the folder has no playbook and main-playbook is not set", function()
    ops.fs.remove(dir .. "/playbook.yaml")
    write("vars.yaml", "a: 1\n")
    local step = step_with()
    assert.are.equal("no playbook in test/ansible (a .yaml file holding a list of plays), and no "
      .. "cli.main-playbook (test/ansible/bitops.config.yaml)", failure(step))
    assert.are.same({}, step.commands)
  end)

  it("runs only cli.main-playbook when it is one name (BitOps' form)", function()
    write("site.yaml", PLAY)
    local step = deployed{cli = {["main-playbook"] = {"site.yaml"}}}
    assert.are.same({"ansible-playbook site.yaml"}, step.commands)
  end)

  it("runs a cli.main-playbook list in its own order, any file name, subfolders too", function()
    write("site.yaml", PLAY)
    write("plays/db.play", PLAY)
    local step = deployed{cli = {["main-playbook"] = {"site.yaml", "plays/db.play", "playbook.yaml"}}}
    assert.are.same({"ansible-playbook site.yaml", "ansible-playbook plays/db.play",
                     "ansible-playbook playbook.yaml"}, step.commands)
  end)

  it("fails before running anything when a main-playbook is missing", function()
    local step = step_with{cli = {["main-playbook"] = {"playbook.yaml", "sitte.yaml"}}}
    assert.are.equal("cli.main-playbook names sitte.yaml, which is not a file in test/ansible "
      .. "(test/ansible/bitops.config.yaml)", failure(step))
    assert.are.same({}, step.commands)
  end)

  it("stops at the first playbook that fails", function()
    write("a.yaml", PLAY)
    local step = step_with{results = {["ansible-playbook a.yaml"] = {ok = false, code = 2, stderr = "fatal"}}}
    assert.are.equal("ansible-playbook a.yaml failed (exit 2): fatal", failure(step))
    assert.are.same({"ansible-playbook a.yaml"}, step.commands)
  end)
end)

describe("ansible driver: cli flags", function()
  local function one(cli, options)
    return deployed{cli = cli, options = options}.commands
  end

  it("passes no flag when nothing is set", function()
    assert.are.same({"ansible-playbook playbook.yaml"}, one({}))
  end)

  it("--inventory", function()
    assert.are.same({"ansible-playbook playbook.yaml --inventory hosts.yaml"}, one({inventory = "hosts.yaml"}))
  end)

  it("--extra-vars, once per item, in order", function()
    local step = deployed{cli = {["extra-vars"] = {"@extra-vars.json", "app_version=1.4 env=prod"}}}
    assert.are.same({"ansible-playbook", "playbook.yaml", "--extra-vars", "@extra-vars.json",
                     "--extra-vars", "app_version=1.4 env=prod"}, step.runs[1].argv)
  end)

  it("--tags and --skip-tags, as given (comma-separated lists stay one argument)", function()
    assert.are.same({"ansible-playbook playbook.yaml --tags web,db"}, one({tags = "web,db"}))
    assert.are.same({"ansible-playbook playbook.yaml --skip-tags slow"}, one({["skip-tags"] = "slow"}))
  end)

  it("--forks, a whole number", function()
    assert.are.same({"ansible-playbook playbook.yaml --forks 20"}, one({forks = 20}))
    assert.are.same({"ansible-playbook playbook.yaml --forks 3"}, one({forks = 3.0}))
    for _, bad in ipairs({0, -1, 2.5}) do
      assert.are.equal("cli.forks must be a whole number of at least 1, not " .. tostring(bad)
        .. " (test/ansible/bitops.config.yaml)", failure(step_with{cli = {forks = bad}}))
    end
  end)

  it("--flush-cache and --force-handlers when true, nothing when false", function()
    assert.are.same({"ansible-playbook playbook.yaml --flush-cache --force-handlers"},
      one({["flush-cache"] = true, ["force-handlers"] = true}))
    assert.are.same({"ansible-playbook playbook.yaml"}, one({["flush-cache"] = false, ["force-handlers"] = false}))
  end)

  it("options.dryrun adds --check; false adds nothing", function()
    assert.are.same({"ansible-playbook playbook.yaml --check"}, one({}, {dryrun = true}))
    assert.are.same({"ansible-playbook playbook.yaml"}, one({}, {dryrun = false}))
  end)

  it("cli.dryrun (where newer BitOps schemas put it) adds --check too", function()
    assert.are.same({"ansible-playbook playbook.yaml --check"}, one({dryrun = true}))
  end)

  it("gives every playbook the same flags, in a fixed order", function()
    write("site.yaml", PLAY)
    local flags = " --inventory inv.ini --extra-vars a=1 --extra-vars b=2 --tags t --skip-tags s --forks 5"
      .. " --flush-cache --force-handlers --check"
    local step = deployed{cli = {inventory = "inv.ini", ["extra-vars"] = {"a=1", "b=2"}, tags = "t",
                                 ["skip-tags"] = "s", forks = 5, ["flush-cache"] = true,
                                 ["force-handlers"] = true},
                          options = {dryrun = true}}
    assert.are.same({"ansible-playbook playbook.yaml" .. flags, "ansible-playbook site.yaml" .. flags},
      step.commands)
  end)
end)

describe("ansible driver: verbosity", function()
  it("sets options.verbosity as ANSIBLE_VERBOSITY for ansible-playbook, not as a -v flag", function()
    local step = deployed{options = {verbosity = 3}}
    assert.are.same({"ansible-playbook playbook.yaml"}, step.commands)
    assert.are.same({ANSIBLE_VERBOSITY = "3"}, step.runs[1].opts.env)
    assert.is_nil(step.vars.ANSIBLE_VERBOSITY)
  end)

  it("leaves an ANSIBLE_VERBOSITY of the environment alone when the option is not set", function()
    local step = deployed{vars = {ANSIBLE_VERBOSITY = "2"}}
    assert.are.same({"ansible-playbook playbook.yaml"}, step.commands)
    assert.is_nil(step.runs[1].opts.env)
    assert.are.equal("2", step.vars.ANSIBLE_VERBOSITY)
  end)

  it("lets the option win over ANSIBLE_VERBOSITY from the environment or extra_env", function()
    write("extra_env", "ANSIBLE_VERBOSITY=4\n")
    local step = deployed{options = {verbosity = 0}}
    assert.are.equal("4", step.vars.ANSIBLE_VERBOSITY)
    assert.are.same({ANSIBLE_VERBOSITY = "0"}, step.runs[1].opts.env) -- a command's env beats step.vars
  end)

  it("refuses a verbosity that is not 0 to 6", function()
    for _, bad in ipairs({7, -1, 1.5}) do
      local step = step_with{options = {verbosity = bad}}
      assert.are.equal("options.verbosity must be a whole number from 0 to 6 (the number of -v), not "
        .. tostring(bad) .. " (test/ansible/bitops.config.yaml)", failure(step))
      assert.are.same({}, step.commands)
    end
  end)
end)

describe("ansible driver: extra_env", function()
  it("loads KEY=VALUE lines into the step's variables before the playbooks run", function()
    write("extra_env", "APP_ENV=prod\nDB_HOST=db.internal\n")
    local step = deployed()
    assert.are.equal("prod", step.vars.APP_ENV)
    assert.are.equal("db.internal", step.vars.DB_HOST)
    assert.are.same({"ansible-playbook playbook.yaml"}, step.commands)
  end)

  it("reads it as bash's `source` would: export, quotes, escapes, comments, blank lines", function()
    write("extra_env", table.concat({
      "# settings for the playbooks",
      "",
      "export EXPORTED=yes",
      "  INDENTED=1",
      'DOUBLE="two words"',
      "SINGLE='a \"b\" c'",
      "LITERAL='$HOME \\n'",
      'ESCAPED="say \\"hi\\" \\\\ \\$HOME"',
      "EMPTY=",
      'EMPTY_QUOTED=""',
      "HASH=a#b",
      "COMMENTED=value   # the rest is a comment",
      'QUOTED_COMMENT="x # not a comment" # but this is',
      "EQUALS=a=b=c",
      "WINDOWS=crlf\r",
      "LAST=no-newline",
    }, "\n"))
    local v = deployed().vars
    assert.are.equal("yes", v.EXPORTED)
    assert.are.equal("1", v.INDENTED)
    assert.are.equal("two words", v.DOUBLE)
    assert.are.equal('a "b" c', v.SINGLE)
    assert.are.equal("$HOME \\n", v.LITERAL)
    assert.are.equal('say "hi" \\ $HOME', v.ESCAPED)
    assert.are.equal("", v.EMPTY)
    assert.are.equal("", v.EMPTY_QUOTED)
    assert.are.equal("a#b", v.HASH)
    assert.are.equal("value", v.COMMENTED)
    assert.are.equal("x # not a comment", v.QUOTED_COMMENT)
    assert.are.equal("a=b=c", v.EQUALS)
    assert.are.equal("crlf", v.WINDOWS)
    assert.are.equal("no-newline", v.LAST)
  end)

  it("fails on a malformed line, naming file:line (blank and comment lines counted)", function()
    for _, case in ipairs({
      {"A=1\n\n# c\nnot a setting\n", 4, "expected KEY=VALUE", "not a setting"},
      {"A=1\n1BAD=x\n", 2, "expected KEY=VALUE", "1BAD=x"},
      {"A=two words\n", 1, "unexpected text after the value (quote a value that has spaces)", "A=two words"},
      {'A="open\n', 1, "the double quote is not closed", 'A="open'},
      {"\nA='open\n", 2, "the single quote is not closed", "A='open"},
      {"KEY = value\n", 1, "expected KEY=VALUE", "KEY = value"},
      {"A=1\nB=x\0y\n", 2, "the value holds a NUL byte, which no variable can carry", "B=x\0y"},
    }) do
      helpers.write(dir .. "/extra_env", case[1])
      local step = step_with()
      assert.are.equal(string.format('test/ansible/extra_env:%d: %s, got %q (write KEY=value, '
        .. 'KEY="value" or export KEY=value)', case[2], case[3], case[4]), failure(step))
      assert.are.same({}, step.commands)
    end
  end)

  it("does nothing without an extra_env file", function()
    local step = deployed{vars = {KEEP = "1"}}
    assert.are.same({KEEP = "1"}, step.vars)
  end)
end)

describe("ansible playbook names", function()
  local fake = require "fake_step"
  local h = require "helpers"

  it("never hands ansible-playbook a name it would read as an option", function()
    local dir = h.tmpdir()
    h.write(dir .. "/-e@evil.yaml", "- hosts: localhost\n  tasks: []\n")
    h.write(dir .. "/site.yaml", "- hosts: localhost\n  tasks: []\n")
    local driver = require "tools.ansible"
    local step = fake.new({tool = "ansible", dir = dir, config = {cli = {}, options = {}}})
    driver:deploy(step)
    assert.are.same({"ansible-playbook site.yaml"}, step.commands)
    local named = fake.new({tool = "ansible", dir = dir, config = {cli = {["main-playbook"] = {"-e@evil.yaml"}}, options = {}}})
    local ok, err = pcall(driver.deploy, driver, named)
    assert.is_false(ok)
    assert.matches("starts with '%-'", err.message)
    h.rmtree(dir)
  end)
end)
