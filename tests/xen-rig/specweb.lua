-- A SPECweb99-like request mix for wrk (wrk -s specweb.lua URL [-- DYN [SEED]]), against
-- the rig domU's Apache (tests/xen-rig/domu-httpd.conf):
--   static, from SPECweb99's four size classes of the document tree /specweb/class<c>_<i>:
--     35 % class 0 (102..921 B), 50 % class 1 (1..9 KiB), 14 % class 2 (10..90 KiB),
--     1 % class 3 (100..900 KiB); within a class, file i by SPECweb99's Zipf-like table;
--   dynamic, a share DYN (default 0.1) of all requests: /cgi-bin/counter (a CGI whose
--     answer is a counter kept in the guest's memory).
-- At the end it prints one line for the rig's scripts to read (latencies in microseconds):
--   SPECWEB requests=N duration_us=D bytes=B rps=R p50_us=.. p99_us=.. errors=connect/read/write/status/timeout
-- Seeded (SEED, default 99): the same sequence of paths in every run.

local dyn = 0.1
local seed = 99
local class_share = { 0.35, 0.50, 0.14, 0.01 }
-- SPECweb99's access frequencies of the nine files of a class (file 1..9).
local file_share = { 0.039, 0.059, 0.088, 0.177, 0.353, 0.118, 0.071, 0.050, 0.045 }

-- pick(shares): an index drawn with the given probabilities (they sum to 1).
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
	if args[1] then
		dyn = tonumber(args[1]) or dyn
	end
	if args[2] then
		seed = tonumber(args[2]) or seed
	end
	math.randomseed(seed)
end

function request()
	if math.random() < dyn then
		return wrk.format("GET", "/cgi-bin/counter")
	end
	local c = pick(class_share) - 1
	local i = pick(file_share)
	return wrk.format("GET", "/specweb/class" .. c .. "_" .. i)
end

function done(summary, latency, requests)
	local e = summary.errors
	local secs = summary.duration / 1e6
	io.write(string.format(
		"SPECWEB requests=%d duration_us=%d bytes=%d rps=%.1f p50_us=%d p99_us=%d errors=%d/%d/%d/%d/%d\n",
		summary.requests, summary.duration, summary.bytes, summary.requests / secs,
		latency:percentile(50), latency:percentile(99),
		e.connect, e.read, e.write, e.status, e.timeout))
end
