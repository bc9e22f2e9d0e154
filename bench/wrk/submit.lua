-- wrk script for bench/pipeline.py: each connection GETs the refill form, then POSTs it
-- filled in with the page's CSRF token, stamp and session cookie, and starts over.
--
-- wrk runs one Lua state per thread, shared by that thread's connections, and response()
-- does not say which connection answered. So forms are kept in a queue: request() POSTs the
-- oldest unused form if there is one, else GETs a new one. Each form is sent exactly once
-- (Intake's stamp is a one-time key), and a connection may send a form another one fetched;
-- the session cookie travels with the form, so that is what a browser would send too.
--
-- Environment: BENCH_PATH (default /refill), BENCH_HOST (Host and Referer, e.g.
-- 127.0.0.1:8000), BENCH_DELAY_MS (wait before each GET, for a paced run; default 0).

local path = os.getenv("BENCH_PATH") or "/refill"
local host = os.getenv("BENCH_HOST") or "127.0.0.1"
local delay_ms = tonumber(os.getenv("BENCH_DELAY_MS") or "0")

local fields = {
  first_name = "Maria", last_name = "Nunez-Ortiz", date_of_birth = "1980-03-15",
  phone = "(202) 555-0143", email = "maria@example.com", contact_method = "sms",
  rx_numbers = "1234567\n7654321", medication = "Immune globulin", location = "main",
  fulfillment = "pickup", address = "", needed_by = "", notes = "",
  consent_privacy = "y", consent_contact = "y", extra_comments = "",
}

local function encode(value)
  return (value:gsub("[^%w%-%._~]", function(c) return string.format("%%%02X", string.byte(c)) end))
end

local static = {}
for name, value in pairs(fields) do
  static[#static + 1] = name .. "=" .. encode(value)
end
static = table.concat(static, "&")

local queue, head, tail = {}, 1, 0
sent_get, sent_post, pending_post = 0, 0, 0
forms, accepted, refused, throttled, other = 0, 0, 0, 0, 0

local base_headers = {
  ["Host"] = host,
  -- As the TLS proxy in front of gunicorn sets them (gunicorn trusts 127.0.0.1).
  ["X-Forwarded-Proto"] = "https",
  ["X-Forwarded-For"] = "127.0.0.1",
}

local function hidden(body, name)
  local tag = body:match('<input[^>]-name="' .. name .. '"[^>]->')
  return tag and tag:match('value="([^"]*)"')
end

local function cookies(headers)
  local found = {}
  for name, value in pairs(headers) do
    if name:lower() == "set-cookie" then
      found[#found + 1] = value:match("^%s*([^;]+)")
    end
  end
  return table.concat(found, "; ")
end

function delay()
  if tail < head and delay_ms > 0 then
    return delay_ms
  end
  return 0
end

function request()
  if head <= tail then
    local form = queue[head]
    queue[head] = nil
    head = head + 1
    sent_post = sent_post + 1
    local headers = {}
    for k, v in pairs(base_headers) do headers[k] = v end
    headers["Content-Type"] = "application/x-www-form-urlencoded"
    headers["Referer"] = "https://" .. host .. path
    headers["Cookie"] = form.cookie
    local body = static .. "&csrf_token=" .. encode(form.csrf) .. "&rendered_at=" .. encode(form.stamp)
    return wrk.format("POST", path, headers, body)
  end
  sent_get = sent_get + 1
  return wrk.format("GET", path, base_headers)
end

function response(status, headers, body)
  if status == 200 then
    local csrf, stamp = hidden(body, "csrf_token"), hidden(body, "rendered_at")
    if csrf and stamp then
      forms = forms + 1
      tail = tail + 1
      queue[tail] = { csrf = csrf, stamp = stamp, cookie = cookies(headers) }
    else
      other = other + 1
    end
  elseif status == 303 then
    accepted = accepted + 1
  elseif status == 429 then
    throttled = throttled + 1
  elseif status == 400 then
    refused = refused + 1
  else
    other = other + 1
  end
end

local threads = {}

function setup(thread)
  threads[#threads + 1] = thread
end

function done(summary, latency, requests)
  local totals = { forms = 0, accepted = 0, refused = 0, throttled = 0, other = 0 }
  for _, thread in ipairs(threads) do
    for name, _ in pairs(totals) do
      totals[name] = totals[name] + thread:get(name)
    end
  end
  io.write(string.format(
    "BENCH {\"forms\": %d, \"accepted\": %d, \"refused\": %d, \"throttled\": %d, \"other\": %d, " ..
    "\"requests\": %d, \"duration_us\": %d, \"errors\": %d, \"latency_p50_us\": %d, \"latency_p95_us\": %d}\n",
    totals.forms, totals.accepted, totals.refused, totals.throttled, totals.other,
    summary.requests, summary.duration,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.status + summary.errors.timeout,
    latency:percentile(50), latency:percentile(95)))
end
