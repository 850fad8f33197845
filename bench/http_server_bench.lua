-- The opsrun side of bench/http_server_bench.sh: a webhook-style endpoint.
--   opsrun bench/http_server_bench.lua PORT SECRET [exec]
-- POST /hooks/bench: verifies X-Hub-Signature-256 (HMAC-SHA256 of the body) with ops.crypto
-- and answers 202; with "exec", it also runs /bin/true in a task of its
-- own after answering, as webhook runs its execute-command. GET /quit closes the server.
local port, secret, exec = tonumber(arg[1]) or 0, arg[2] or "s3cret", arg[3] == "exec"

local srv
srv = assert(ops.http.serve({
  listen = "127.0.0.1:" .. port,
  handler = function(req)
    if req.path == "/quit" then
      ops.spawn(function() srv:close(1) end)
      return 200, {}, "bye\n"
    end
    if req.method ~= "POST" or req.path ~= "/hooks/bench" then return 404, {}, "no such hook\n" end
    if not ops.crypto.verify_hmac_sha256(secret, req.body, req.headers["x-hub-signature-256"]) then
      return 403, {["content-type"] = "text/plain"}, "signature mismatch\n"
    end
    if exec then ops.spawn(function() ops.proc.run({"/bin/true"}) end) end
    return 202, {["content-type"] = "text/plain"}, "accepted\n"
  end,
}))
print(srv.port)
io.stdout:flush()
