-- Runs inside opsrun after the playbook, with the step: check what the playbook wrote.
local step = ...
local conf = "/tmp/opsrun-example/" .. step.env .. "/app.conf"
local text = assert(ops.fs.read(conf))
assert(text:find("greeting = hello-from-local", 1, true), "app.conf lacks the greeting")
step.log.info("after deploy: " .. conf .. " is in place")
