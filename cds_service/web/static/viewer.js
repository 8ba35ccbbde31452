/*
 * The card viewer: loads an example hook request, fires it at this service with fetch(), and shows the
 * cards the way an EHR would. Suggestions are buttons; choosing one shows the actions it would apply and
 * sends "accepted" feedback; overriding with a reason sends "overridden" feedback (CDS Hooks 2.0 §Feedback).
 *
 * Card content is only ever set with textContent or built by CardMarkdown (text nodes): never as HTML.
 */
(function () {
  "use strict";

  var INDICATORS = ["info", "warning", "critical"];

  function $(id) {
    return document.getElementById(id);
  }

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function isObject(value) {
    return value !== null && typeof value === "object" && !Array.isArray(value);
  }

  function str(value) {
    return typeof value === "string" ? value : "";
  }

  // RFC 4122 version 4 UUID; crypto.getRandomValues works outside secure contexts too.
  function uuid4() {
    var b = new Uint8Array(16);
    crypto.getRandomValues(b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    var hex = Array.prototype.map.call(b, function (x) {
      return (x + 0x100).toString(16).slice(1);
    }).join("");
    return hex.slice(0, 8) + "-" + hex.slice(8, 12) + "-" + hex.slice(12, 16) + "-" + hex.slice(16, 20) + "-" +
      hex.slice(20);
  }

  function link(label, url) {
    var href = window.CardMarkdown.safeUrl(str(url));
    if (!href) return el("span", null, label);
    var a = el("a", null, label);
    a.href = href;
    a.target = "_blank";
    a.rel = "noopener noreferrer";
    return a;
  }

  function showError(message) {
    var box = $("request-error");
    box.textContent = message || "";
    box.hidden = !message;
  }

  // ----- the request ---------------------------------------------------------------------------------

  function chooseServiceFor(hook) {
    var select = $("service");
    for (var i = 0; i < select.options.length; i++) {
      if (select.options[i].getAttribute("data-hook") === hook) {
        select.selectedIndex = i;
        return;
      }
    }
  }

  function loadFixture() {
    var name = $("fixture").value;
    if (!name) return Promise.resolve();
    showError("");
    return fetch("/viewer/fixtures/" + encodeURIComponent(name), { headers: { Accept: "application/json" } })
      .then(function (response) {
        return response.text().then(function (text) {
          if (!response.ok) throw new Error("could not load " + name + " (HTTP " + response.status + ")");
          return text;
        });
      })
      .then(function (text) {
        var body;
        try {
          body = JSON.parse(text);
          $("request-json").value = JSON.stringify(body, null, 2);
        } catch (e) {
          $("request-json").value = text;
        }
        if (isObject(body) && typeof body.hook === "string") chooseServiceFor(body.hook);
        $("request-json").setAttribute("data-loaded", name);
      })
      .catch(function (error) {
        showError(error.message);
      });
  }

  function fire() {
    showError("");
    var body;
    try {
      body = JSON.parse($("request-json").value);
    } catch (e) {
      showError("The request is not valid JSON: " + e.message);
      return Promise.resolve();
    }
    if (isObject(body) && $("fresh-instance").checked) {
      body.hookInstance = uuid4();
      $("request-json").value = JSON.stringify(body, null, 2);
    }
    var serviceId = $("service").value;
    var button = $("fire");
    button.disabled = true;
    $("call-status").textContent = "Calling " + serviceId + "…";
    $("call-status").className = "status pending";
    var started = performance.now();
    return fetch("/cds-services/" + encodeURIComponent(serviceId), {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify(body)
    })
      .then(function (response) {
        return response.text().then(function (text) {
          showResponse(serviceId, response.status, text, performance.now() - started);
        });
      })
      .catch(function (error) {
        $("call-status").textContent = "The call failed: " + error.message;
      })
      .then(function () {
        button.disabled = false;
      });
  }

  // ----- the response --------------------------------------------------------------------------------

  function clearResponse() {
    $("cards").replaceChildren();
    $("system-actions").hidden = true;
    $("system-actions-list").replaceChildren();
    $("raw").hidden = true;
  }

  function showResponse(serviceId, status, text, millis) {
    clearResponse();
    var data = null;
    try {
      data = JSON.parse(text);
    } catch (e) {
      data = null;
    }
    var latency = Math.round(millis) + " ms";
    $("raw-json").textContent = data !== null ? JSON.stringify(data, null, 2) : text;
    $("raw").hidden = false;
    if (status !== 200 || !isObject(data)) {
      var message = isObject(data) && typeof data.message === "string" ? data.message : "not a JSON object";
      $("call-status").textContent = "HTTP " + status + " in " + latency + ": " + message;
      $("call-status").className = "status failed";
      return;
    }
    var cards = Array.isArray(data.cards) ? data.cards : [];
    var actions = Array.isArray(data.systemActions) ? data.systemActions : [];
    $("call-status").textContent = "HTTP " + status + " in " + latency + " · " + cards.length +
      (cards.length === 1 ? " card" : " cards") + (actions.length ? " · " + actions.length + " system action" +
      (actions.length === 1 ? "" : "s") : "");
    $("call-status").className = "status ok";
    $("call-status").setAttribute("data-latency-ms", String(Math.round(millis)));
    if (!cards.length) $("cards").appendChild(el("p", "empty", "No cards: the service has nothing to say about this order."));
    cards.forEach(function (card) {
      if (isObject(card)) $("cards").appendChild(renderCard(serviceId, card));
    });
    if (actions.length) {
      actions.forEach(function (action) {
        $("system-actions-list").appendChild(el("li", null, describeAction(action)));
      });
      $("system-actions-json").textContent = JSON.stringify(actions, null, 2);
      $("system-actions").hidden = false;
    }
  }

  var SYSTEMS = {
    "http://www.ama-assn.org/go/cpt": "CPT",
    "http://snomed.info/sct": "SNOMED CT",
    "http://loinc.org": "LOINC",
    "https://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets": "HCPCS"
  };

  function codingText(coding) {
    if (!isObject(coding) || !str(coding.code)) return "";
    var system = str(coding.system);
    return SYSTEMS[system] ? SYSTEMS[system] + " " + coding.code : (system ? system + "|" : "") + coding.code;
  }

  function describeResource(resource) {
    if (!isObject(resource)) return "a resource";
    var name = str(resource.resourceType) || "resource";
    if (!isObject(resource.code)) return name + (str(resource.id) ? "/" + resource.id : "");
    var codings = Array.isArray(resource.code.coding) ? resource.code.coding.map(codingText).filter(Boolean) : [];
    var text = str(resource.code.text);
    var label = text || (codings.length ? codings.join(", ") : "(no code)");
    return name + " \u201c" + label + "\u201d" + (text && codings.length ? " (" + codings.join(", ") + ")" : "");
  }

  function describeAction(action) {
    if (!isObject(action)) return "(not an action)";
    var type = str(action.type);
    var what;
    if (type === "delete") {
      what = "Delete " + (str(action.resourceId) || (typeof action.resource === "string" ? action.resource : "an order"));
    } else if (type === "create") {
      what = "Create " + describeResource(action.resource);
    } else if (type === "update") {
      var r = action.resource;
      what = "Update " + (isObject(r) && str(r.resourceType) ? r.resourceType + (str(r.id) ? "/" + r.id : "") : "a resource");
    } else {
      what = "Unknown action type " + JSON.stringify(action.type);
    }
    return what + (str(action.description) ? ": " + action.description : "");
  }

  function renderCard(serviceId, card) {
    var indicator = INDICATORS.indexOf(card.indicator) !== -1 ? card.indicator : "unknown";
    var article = el("article", "card indicator-" + indicator);
    if (str(card.uuid)) article.setAttribute("data-card-uuid", card.uuid);

    var head = el("header", "card-head");
    head.appendChild(el("span", "badge", indicator));
    head.appendChild(el("h3", "summary", str(card.summary)));
    article.appendChild(head);

    if (str(card.detail)) {
      var detail = el("div", "detail");
      detail.appendChild(window.CardMarkdown.render(card.detail));
      article.appendChild(detail);
    }

    var source = isObject(card.source) ? card.source : {};
    var sourceLine = el("p", "source", "Source: ");
    sourceLine.appendChild(link(str(source.label) || "(no label)", source.url));
    article.appendChild(sourceLine);

    var outcome = el("div", "outcome");
    var suggestions = Array.isArray(card.suggestions) ? card.suggestions.filter(isObject) : [];
    if (suggestions.length) {
      var box = el("div", "suggestions");
      var behaviour = card.selectionBehavior === "any" ? "choose any" : "choose at most one";
      box.appendChild(el("p", "label", "Suggestions (" + behaviour + "):"));
      var buttons = [];
      suggestions.forEach(function (suggestion) {
        var button = el("button", "suggestion", str(suggestion.label) + (suggestion.isRecommended === true ? " (recommended)" : ""));
        button.type = "button";
        if (str(suggestion.uuid)) button.setAttribute("data-suggestion-uuid", suggestion.uuid);
        button.addEventListener("click", function () {
          if (card.selectionBehavior !== "any") {
            buttons.forEach(function (b) { b.disabled = true; });
          } else {
            button.disabled = true;
          }
          button.classList.add("chosen");
          disableAll(article, ".override select, .override input, .override button");
          accept(serviceId, card, suggestion, outcome);
        });
        buttons.push(button);
        box.appendChild(button);
      });
      article.appendChild(box);
    }

    var links = Array.isArray(card.links) ? card.links.filter(isObject) : [];
    if (links.length) {
      var linkBox = el("p", "links", "Links: ");
      links.forEach(function (item, index) {
        if (index) linkBox.appendChild(document.createTextNode(" · "));
        if (item.type === "smart") {
          linkBox.appendChild(el("span", "smart", str(item.label) + " (SMART app: needs a launch from an EHR)"));
        } else {
          linkBox.appendChild(link(str(item.label), item.url));
        }
      });
      article.appendChild(linkBox);
    }

    article.appendChild(renderOverride(serviceId, card, outcome));
    article.appendChild(outcome);
    return article;
  }

  function disableAll(root, selector) {
    Array.prototype.forEach.call(root.querySelectorAll(selector), function (control) {
      control.disabled = true;
    });
  }

  function renderOverride(serviceId, card, outcome) {
    var reasons = Array.isArray(card.overrideReasons) ? card.overrideReasons.filter(isObject) : [];
    var box = el("div", "override");
    var select = el("select", "override-reason");
    select.setAttribute("aria-label", "Override reason");
    select.appendChild(el("option", null, reasons.length ? "Choose a reason…" : "No reason"));
    select.options[0].value = "";
    reasons.forEach(function (reason, index) {
      var option = el("option", null, str(reason.display) || str(reason.code));
      option.value = String(index);
      select.appendChild(option);
    });
    var comment = el("input", "override-comment");
    comment.type = "text";
    comment.placeholder = "Comment (optional)";
    comment.setAttribute("aria-label", "Override comment");
    var button = el("button", "override-button", "Override");
    button.type = "button";
    button.addEventListener("click", function () {
      var reason = select.value === "" ? null : reasons[Number(select.value)];
      disableAll(box.parentNode, "button, select, input");
      override(serviceId, card, reason, comment.value.trim(), outcome);
    });
    box.appendChild(el("span", "label", reasons.length ? "Override with a reason:" : "Dismiss:"));
    box.appendChild(select);
    box.appendChild(comment);
    box.appendChild(button);
    return box;
  }

  // ----- choosing ------------------------------------------------------------------------------------

  function accept(serviceId, card, suggestion, outcome) {
    var actions = Array.isArray(suggestion.actions) ? suggestion.actions : [];
    var section = el("div", "applied");
    section.appendChild(el("p", "label", "Chosen: " + str(suggestion.label) + ". The EHR would apply:"));
    var list = el("ul", "actions");
    actions.forEach(function (action) {
      list.appendChild(el("li", null, describeAction(action)));
    });
    if (!actions.length) list.appendChild(el("li", null, "(no actions)"));
    section.appendChild(list);
    var details = el("details");
    details.appendChild(el("summary", null, "Actions as JSON"));
    var json = el("pre", "actions-json", JSON.stringify(actions, null, 2));
    json.setAttribute("tabindex", "0"); // a scrolling box: reachable and scrollable from the keyboard
    details.appendChild(json);
    section.appendChild(details);
    outcome.appendChild(section);
    if (!str(card.uuid) || !str(suggestion.uuid)) {
      outcome.appendChild(el("p", "feedback", "No feedback sent: the card or the suggestion has no uuid."));
      return Promise.resolve();
    }
    return sendFeedback(serviceId, {
      card: card.uuid,
      outcome: "accepted",
      acceptedSuggestions: [{ id: suggestion.uuid }],
      outcomeTimestamp: new Date().toISOString()
    }, outcome, "accepted");
  }

  function override(serviceId, card, reason, comment, outcome) {
    var entry = { card: card.uuid, outcome: "overridden" };
    if (reason || comment) {
      entry.overrideReason = {};
      if (reason) entry.overrideReason.reason = { code: reason.code, system: reason.system, display: reason.display };
      if (comment) entry.overrideReason.userComment = comment;
    }
    entry.outcomeTimestamp = new Date().toISOString();
    outcome.appendChild(el("p", "label", "Overridden" + (reason ? ": " + str(reason.display) : "") + (comment ? " (" + comment + ")" : "") + "."));
    if (!str(card.uuid)) {
      outcome.appendChild(el("p", "feedback", "No feedback sent: the card has no uuid."));
      return Promise.resolve();
    }
    return sendFeedback(serviceId, entry, outcome, "overridden");
  }

  function sendFeedback(serviceId, entry, outcome, kind) {
    var line = el("p", "feedback", "Sending " + kind + " feedback…");
    outcome.appendChild(line);
    return fetch("/cds-services/" + encodeURIComponent(serviceId) + "/feedback", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify({ feedback: [entry] })
    })
      .then(function (response) {
        return response.text().then(function (text) {
          var message = "";
          try {
            var data = JSON.parse(text);
            if (isObject(data) && typeof data.message === "string") message = ": " + data.message;
          } catch (e) { /* not JSON */ }
          line.textContent = response.ok
            ? "Feedback sent (" + kind + "), HTTP " + response.status + "."
            : "Feedback not accepted, HTTP " + response.status + message;
          line.className = "feedback " + (response.ok ? "sent" : "failed");
        });
      })
      .catch(function (error) {
        line.textContent = "Feedback could not be sent: " + error.message;
        line.className = "feedback failed";
      });
  }

  // ----- start ---------------------------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", function () {
    $("load-fixture").addEventListener("click", loadFixture);
    $("fixture").addEventListener("change", loadFixture);
    $("fire").addEventListener("click", fire);
    loadFixture().then(function () {
      document.body.setAttribute("data-ready", "true");
    });
  });
})();
