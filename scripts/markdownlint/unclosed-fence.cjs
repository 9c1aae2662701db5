// A markdownlint rule: a fenced code block must be closed. An opening ``` without its closing
// fence turns the rest of the page into code (the README once rendered three sections that way);
// CommonMark allows it, so no built-in rule reports it.
"use strict";

/** @param {any[]} tokens @param {(t: any) => void} visit */
function walk(tokens, visit) {
  for (const token of tokens) {
    visit(token);
    walk(token.children || [], visit);
  }
}

module.exports = {
  names: ["walship-unclosed-fence"],
  description: "Fenced code block is never closed",
  tags: ["code", "walship"],
  parser: "micromark",
  function: (params, onError) => {
    walk(params.parsers.micromark.tokens, (token) => {
      if (token.type !== "codeFenced") {
        return;
      }
      const fences = (token.children || []).filter((c) => c.type === "codeFencedFence");
      if (fences.length < 2) {
        onError({
          lineNumber: token.startLine,
          detail: "this fence is never closed: everything after it renders as code",
        });
      }
    });
  },
};
