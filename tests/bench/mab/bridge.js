"use strict";
// Minimal matrix-appservice-bridge bridge for the Trestle inbound benchmark.
//
//   node bridge.js --port 9100 --count-port 9101 --homeserver http://127.0.0.1:8008 \
//       --hs-token HS --as-token AS [--domain localhost]
//
// A Bridge with its stores disabled whose onEvent only counts events. The count is served as
// JSON `{"handled": N}` on http://127.0.0.1:COUNT_PORT/ so the load generator can check that
// every event it sent was handed to onEvent. Console logging is at warn level.

const http = require("http");
const { Bridge, AppServiceRegistration, Logger } = require("matrix-appservice-bridge");

function parseArgs(argv) {
    const out = {};
    for (let i = 0; i < argv.length; i++) {
        const a = argv[i];
        if (!a.startsWith("--") || i + 1 >= argv.length) {
            throw new Error(`bad argument: ${a}`);
        }
        out[a.slice(2)] = argv[++i];
    }
    for (const k of ["port", "count-port", "homeserver", "hs-token", "as-token"]) {
        if (!out[k]) {
            throw new Error(`missing --${k}`);
        }
    }
    return out;
}

async function main() {
    const args = parseArgs(process.argv.slice(2));
    const domain = args.domain || "localhost";
    const port = Number(args.port);
    const countPort = Number(args["count-port"]);

    Logger.configure({ console: args["log-level"] || "warn" });

    const reg = new AppServiceRegistration(`http://127.0.0.1:${port}`);
    reg.setId("bench");
    reg.setHomeserverToken(args["hs-token"]);
    reg.setAppServiceToken(args["as-token"]);
    reg.setSenderLocalpart("benchbot");
    reg.addRegexPattern("users", `@bench_.*:${domain}`, true);

    let handled = 0;
    const bridge = new Bridge({
        homeserverUrl: args.homeserver,
        domain,
        registration: reg,
        disableStores: true,
        controller: {
            onEvent: () => {
                handled++;
            },
        },
    });

    const counter = http.createServer((req, res) => {
        const body = JSON.stringify({ handled });
        res.writeHead(200, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(body) });
        res.end(body);
    });
    await new Promise((resolve) => counter.listen(countPort, "127.0.0.1", resolve));

    await bridge.run(port, undefined, "127.0.0.1");
    // Stdout line the benchmark script waits for.
    console.log(`mab-bench: listening on 127.0.0.1:${port}, count on 127.0.0.1:${countPort}`);

    const stop = () => {
        console.log(`mab-bench: handled ${handled} events`);
        process.exit(0);
    };
    process.on("SIGTERM", stop);
    process.on("SIGINT", stop);
}

main().catch((e) => {
    console.error("mab-bench: failed to start:", e);
    process.exit(1);
});
