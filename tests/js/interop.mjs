// Reads a note document khub saved, prints what it holds as JSON, then edits
// it as another Automerge actor and writes the new changes (one hex line
// each) for khub to merge, and the edited document saved without compressed
// columns, as a snapshot carries it.
// Usage: node interop.mjs IN.automerge OUT.changes OUT.snapshot
import { readFileSync, writeFileSync } from "node:fs";
import * as Automerge from "@automerge/automerge";

const [input, output, snapshot] = process.argv.slice(2);
const doc = Automerge.load(new Uint8Array(readFileSync(input)), { actor: "0a".repeat(16) });
console.log(
  JSON.stringify({
    title: String(doc.title),
    body: String(doc.body),
    tags: Object.keys(doc.tags).sort(),
    created: doc.created.getTime(),
    deleted: doc.deleted,
  }),
);
const edited = Automerge.change(doc, (d) => {
  Automerge.splice(d, ["body"], 0, 0, "from js: ");
  d.tags["js"] = true;
});
const changes = Automerge.getChanges(doc, edited);
writeFileSync(output, changes.map((c) => Buffer.from(c).toString("hex")).join("\n") + "\n");
writeFileSync(snapshot, Automerge.getBackend(edited).saveNoCompress());
