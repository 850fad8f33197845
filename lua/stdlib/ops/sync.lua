-- ops.sync: task-aware locks for coroutine tasks sharing one thread.
--
-- A mutex is FIFO and hands ownership straight to the next waiter, so a task
-- that unlocks and re-locks cannot overtake tasks already waiting. The scheduler
-- (ops.core.sched) is only needed when a task actually has to wait.

local sync = {}

local Mutex = {}
Mutex.__index = Mutex

function sync.mutex()
  return setmetatable({ owner = nil, waiters = {}, head = 1, tail = 0 }, Mutex)
end

local function remove_waiter(m, co)
  for i = m.head, m.tail do
    if m.waiters[i].co == co then
      for j = i, m.tail - 1 do m.waiters[j] = m.waiters[j + 1] end
      m.waiters[m.tail] = nil
      m.tail = m.tail - 1
      return
    end
  end
end

-- Runs when lock() ends without the lock: the waiting task raised or was
-- cancelled (the scheduler closes its coroutine). Leave the line, or pass on
-- the ownership that was handed over meanwhile.
local Waiting = {}
function Waiting.__close(w)
  if w.done then return end
  if w.mutex.owner == w.co then w.mutex:unlock(w.co) else remove_waiter(w.mutex, w.co) end
end

-- Blocks the current task until it owns the mutex. Not re-entrant.
function Mutex:lock()
  local co = coroutine.running()
  if self.owner == nil then
    self.owner = co
    return
  end
  if self.owner == co then
    error("ops.sync: mutex is already held by this task (it is not re-entrant)", 2)
  end
  local sched = require("ops.core.sched")
  self.tail = self.tail + 1
  self.waiters[self.tail] = { co = co, task = sched.current() }
  local w <close> = setmetatable({ mutex = self, co = co }, Waiting)
  while self.owner ~= co do sched.suspend() end
  w.done = true
end

-- owner defaults to the running task; a cleanup handler that runs while its
-- task is being cancelled passes the task explicitly.
function Mutex:unlock(owner)
  if self.owner ~= (owner or coroutine.running()) then
    error("ops.sync: mutex unlocked by a task that does not hold it", 2)
  end
  if self.head > self.tail then
    self.owner = nil
    return
  end
  local nxt = self.waiters[self.head]
  self.waiters[self.head] = nil
  self.head = self.head + 1
  if self.head > self.tail then self.head, self.tail = 1, 0 end
  self.owner = nxt.co
  require("ops.core.sched").wake(nxt.task)
end

-- True when some task holds the mutex and it is not the current one.
function Mutex:held_by_other()
  return self.owner ~= nil and self.owner ~= coroutine.running()
end

return sync
