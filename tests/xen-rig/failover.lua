-- A checking client for wrk across a failover (tests/xen-rig/xen-netfailover.sh):
--   wrk -t 1 -c C -d D --timeout T -s failover.lua URL -- REFDIR [DYN [SEED [PROGRESS [DYNPATH]]]]
-- Requests: SPECweb99's size classes as in specweb.lua, and a share DYN (default 0.2) of
-- DYNPATH (default /cgi-bin/counter; xen-db.sh's /cgi-bin/insert answers "row N", a new
-- database row's id, and is checked the same way). Every response is checked:
--   a static body must equal, byte for byte, the file of the same length in REFDIR (the
--     document tree fetched before the test and checked against the manifest's sha256;
--     the 36 files' lengths are all different, so the length names the file);
--   a dynamic body is "counter N": N must never be one the client has seen already (a
--     guest whose counter went back past a value the client saw hands that value out
--     again). A value below the largest seen is counted apart ("behind"): with C
--     connections, up to C-1 answers computed earlier may arrive later.
-- At the end it prints (one thread: run it with -t 1):
--   FAILOVER responses=N static=S dynamic=D bad_status=B bad_body=W dup=U behind=H
--            counter_first=F counter_max=M errors=connect/read/write/status/timeout
--   SERIES t:n:m,...   per second of the clock (os.time()): responses completed, and the
--                      largest counter the client had seen by then (-1 before any)
--   SEEN n,n,...       every counter value (row id) received, ascending
-- and, while it runs, appends each finished second's "t:n:m" to the file PROGRESS (so a
-- test can follow the load and end it with SIGINT, after which wrk still prints these).

local dyn = 0.2
local seed = 99
local class_share = { 0.35, 0.50, 0.14, 0.01 }
local file_share = { 0.039, 0.059, 0.088, 0.177, 0.353, 0.118, 0.071, 0.050, 0.045 }
local refs = {}
local progress = nil
local dynpath = "/cgi-bin/counter"

-- What the main state reads from the thread at the end (plain values only).
responses, static, dynamic, bad_status, bad_body, dup, behind = 0, 0, 0, 0, 0, 0, 0
counter_first, counter_max, series, refs_loaded, seen_list = -1, -1, "", 0, ""
local seen = {}
cur_sec, cur_n = 0, 0

local function pick(shares)
	local r = math.random()
	for i, p in ipairs(shares) do
		r = r - p
		if r < 0 then
			return i
		end
	end
	return #shares
end

function init(args)
	local dir = args[1] or "."
	if args[2] then
		dyn = tonumber(args[2]) or dyn
	end
	if args[3] then
		seed = tonumber(args[3]) or seed
	end
	if args[4] then
		progress = io.open(args[4], "a")
	end
	if args[5] then
		dynpath = args[5]
	end
	math.randomseed(seed)
	for c = 0, 3 do
		for i = 1, 9 do
			local f = io.open(dir .. "/class" .. c .. "_" .. i, "rb")
			if f then
				local s = f:read("*a")
				f:close()
				refs[#s] = s
				refs_loaded = refs_loaded + 1
			end
		end
	end
end

function request()
	if math.random() < dyn then
		return wrk.format("GET", dynpath)
	end
	local c = pick(class_share) - 1
	local i = pick(file_share)
	return wrk.format("GET", "/specweb/class" .. c .. "_" .. i)
end

function response(status, headers, body)
	local t = os.time()
	if t ~= cur_sec then
		if cur_n > 0 then
			series = series .. cur_sec .. ":" .. cur_n .. ":" .. counter_max .. ","
			if progress then
				progress:write(cur_sec .. ":" .. cur_n .. ":" .. counter_max .. "\n")
				progress:flush()
			end
		end
		cur_sec, cur_n = t, 0
	end
	cur_n = cur_n + 1
	responses = responses + 1
	if status ~= 200 then
		bad_status = bad_status + 1
		return
	end
	local n = body and tonumber(string.match(body, "^%a+ (%d+)%s*$"))
	if n then
		dynamic = dynamic + 1
		if seen[n] then
			dup = dup + 1
		end
		seen[n] = true
		seen_list = seen_list .. n .. ","
		if counter_first < 0 then
			counter_first = n
		end
		if n < counter_max then
			behind = behind + 1
		else
			counter_max = n
		end
		return
	end
	static = static + 1
	if body == nil or refs[#body] ~= body then
		bad_body = bad_body + 1
	end
end

local threads = {}

function setup(thread)
	table.insert(threads, thread)
end

function done(summary, latency, requests)
	local e = summary.errors
	for _, t in ipairs(threads) do
		local s = t:get("series")
		if t:get("cur_n") > 0 then -- the last second, still counting
			s = s .. t:get("cur_sec") .. ":" .. t:get("cur_n") .. ":" .. t:get("counter_max") .. ","
		end
		io.write(string.format(
			"FAILOVER responses=%d static=%d dynamic=%d bad_status=%d bad_body=%d dup=%d behind=%d counter_first=%d counter_max=%d refs=%d errors=%d/%d/%d/%d/%d\n",
			t:get("responses"), t:get("static"), t:get("dynamic"), t:get("bad_status"),
			t:get("bad_body"), t:get("dup"), t:get("behind"), t:get("counter_first"),
			t:get("counter_max"), t:get("refs_loaded"),
			e.connect, e.read, e.write, e.status, e.timeout))
		io.write("SERIES " .. s .. "\n")
		local ids = {}
		for v in string.gmatch(t:get("seen_list"), "(%d+),") do
			table.insert(ids, tonumber(v))
		end
		table.sort(ids)
		io.write("SEEN " .. table.concat(ids, ",") .. "\n")
	end
end
