"use strict";
// Stand-in for @matrix-org/matrix-sdk-crypto-nodejs. The benchmark bridge never
// enables encryption, so nothing here is ever called; every export is a class or
// enum that throws if someone does try to use it.
function unavailable(name) {
    return class {
        constructor() {
            throw new Error(`${name}: native crypto is stubbed out in the benchmark install`);
        }
    };
}
const handler = {
    get(target, prop) {
        if (prop === "__esModule") {
            return false;
        }
        if (typeof prop !== "string") {
            return undefined;
        }
        if (!(prop in target)) {
            target[prop] = unavailable(prop);
        }
        return target[prop];
    },
};
module.exports = new Proxy({}, handler);
