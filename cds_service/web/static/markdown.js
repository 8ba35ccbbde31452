/*
 * A small, safe Markdown renderer for CDS Hooks card details.
 *
 * Safety comes from never parsing HTML: the card text is only ever placed in the page as text nodes
 * (document.createTextNode / textContent), so "<script>" or "<img onerror=...>" in a card is shown as those
 * characters and cannot run. The Markdown subset is built as DOM elements: paragraphs, bullet and numbered
 * lists, **bold**, *italics*, `code`, and [links](https://...) whose target is http: or https: only (any other
 * link is shown as plain text). Everything else is shown as written.
 *
 * Exposes window.CardMarkdown = { render(text) -> DocumentFragment, safeUrl(text) -> string | null }.
 */
(function () {
  "use strict";

  var BULLET = /^\s{0,3}[-*+]\s+(.*)$/;
  var NUMBERED = /^\s{0,3}(\d{1,9})[.)]\s+(.*)$/;
  var LINK = /^\[([^\]\n]+)\]\(\s*([^()\s]+)\s*\)/;
  var ESCAPABLE = "\\`*_{}[]()#+-.!<>";

  function safeUrl(text) {
    var url;
    try {
      url = new URL(text);
    } catch (e) {
      return null;
    }
    return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
  }

  function isWordChar(ch) {
    return !!ch && /[A-Za-z0-9]/.test(ch);
  }

  // Index of the closing `delim` for an emphasis opened at `start` (content must not start or end with space).
  function closing(text, start, delim) {
    var from = start + delim.length;
    if (from >= text.length || /\s/.test(text.charAt(from))) return -1;
    var at = text.indexOf(delim, from);
    while (at !== -1) {
      var single = delim.length === 1;
      var doubled = single && text.charAt(at + 1) === delim;
      var wordAfter = delim.charAt(0) === "_" && isWordChar(text.charAt(at + delim.length));
      if (at > from && !/\s/.test(text.charAt(at - 1)) && !doubled && !wordAfter) return at;
      at = text.indexOf(delim, at + (doubled ? 2 : 1));
    }
    return -1;
  }

  // Append the inline Markdown in `text` to `parent` as text nodes and elements.
  function inline(text, parent) {
    var buffer = "";
    function flush() {
      if (buffer) parent.appendChild(document.createTextNode(buffer));
      buffer = "";
    }
    var i = 0;
    while (i < text.length) {
      var ch = text.charAt(i);
      var next = text.charAt(i + 1);
      if (ch === "\\" && next && ESCAPABLE.indexOf(next) !== -1) {
        buffer += next;
        i += 2;
        continue;
      }
      if (ch === "`") {
        var end = text.indexOf("`", i + 1);
        if (end > i + 1) {
          flush();
          var code = document.createElement("code");
          code.textContent = text.slice(i + 1, end);
          parent.appendChild(code);
          i = end + 1;
          continue;
        }
      }
      if (ch === "[") {
        var match = LINK.exec(text.slice(i));
        if (match) {
          var href = safeUrl(match[2]);
          if (href) {
            flush();
            var a = document.createElement("a");
            a.href = href;
            a.target = "_blank";
            a.rel = "noopener noreferrer";
            inline(match[1], a);
            parent.appendChild(a);
          } else {
            buffer += match[0]; // not an http(s) link: shown exactly as written
          }
          i += match[0].length;
          continue;
        }
      }
      if (ch === "*" || ch === "_") {
        // "**" / "__" strong, "*" / "_" emphasis; an unclosed "**" stays text (no fallback to emphasis).
        var marker = next === ch ? ch + ch : ch;
        var end = closing(text, i, marker);
        if (end !== -1 && !(ch === "_" && isWordChar(text.charAt(i - 1)))) {
          flush();
          var span = document.createElement(marker.length === 2 ? "strong" : "em");
          inline(text.slice(i + marker.length, end), span);
          parent.appendChild(span);
          i = end + marker.length;
          continue;
        }
      }
      buffer += ch;
      i += 1;
    }
    flush();
  }

  function render(markdown) {
    var fragment = document.createDocumentFragment();
    var lines = String(markdown == null ? "" : markdown).replace(/\r\n?/g, "\n").split("\n");
    var paragraph = [];
    var list = null; // {element, kind, item: [lines of the current item]}

    function endParagraph() {
      if (!paragraph.length) return;
      var p = document.createElement("p");
      inline(paragraph.join("\n"), p);
      fragment.appendChild(p);
      paragraph = [];
    }
    function endItem() {
      if (list && list.item) {
        var li = document.createElement("li");
        inline(list.item.join("\n"), li);
        list.element.appendChild(li);
        list.item = null;
      }
    }
    function endList() {
      endItem();
      if (list) fragment.appendChild(list.element);
      list = null;
    }
    function startItem(kind, text, number) {
      endParagraph();
      if (!list || list.kind !== kind) {
        endList();
        var element = document.createElement(kind);
        if (kind === "ol" && number !== 1) element.start = number;
        list = { element: element, kind: kind, item: null };
      }
      endItem();
      list.item = [text];
    }

    lines.forEach(function (line) {
      var bullet = BULLET.exec(line);
      var numbered = bullet ? null : NUMBERED.exec(line);
      if (!line.trim()) {
        endParagraph();
        endList();
      } else if (bullet) {
        startItem("ul", bullet[1]);
      } else if (numbered) {
        startItem("ol", numbered[2], parseInt(numbered[1], 10));
      } else if (list && list.item) {
        list.item.push(line.trim()); // continuation of the list item
      } else {
        paragraph.push(line.trim());
      }
    });
    endParagraph();
    endList();
    return fragment;
  }

  window.CardMarkdown = { render: render, safeUrl: safeUrl };
})();
