#!/usr/bin/env python3
"""Writes the demo scenarios for `flywheel simulate`: scenarios/support-routing.json
and, with --mixed, scenarios/support-routing-mixed.json.

Support-ticket routing for Pebble & Pine, a fictional online homeware shop:
the assistant must answer with only {"intent": ..., "order_id": ...}.

    python3 scenarios/make_support_routing.py [--mixed]          # writes the file, prints statistics
    python3 scenarios/make_support_routing.py [--mixed] --check  # exits 1 if the file on disk differs

Standard library only, and deterministic: the same script always writes the same
bytes (fixed seed, sorted iteration, no dependence on hash randomisation).

Traffic (sent during cycles) and held-out (scored after each cycle, never sent)
come from disjoint template sets; the script asserts that, and that no
held-out message or order id appears in traffic.

The two files differ in where the held-out templates come from. In
support-routing.json they are written apart, in words the traffic never uses
("void", "reroute", "bounced"), with their own greetings: a test of
vocabulary no user ever sent, bounded by an assertion on shared word
5-grams. In support-routing-mixed.json all 30 templates of each intent (the
20 traffic and the 10 held-out ones above) form one pool of how customers
write, and 10 drawn at random from it are held out: new phrasings from the
same customers, some of whose wording the traffic has seen.
"""

import itertools
import json
import random
import re
import sys
from pathlib import Path

SEED = 20240611
MIXED = "--mixed" in sys.argv[1:]
NAME = "support-routing-mixed" if MIXED else "support-routing"
OUT = Path(__file__).resolve().parent / f"{NAME}.json"

CYCLES = 3
CHATS_PER_CYCLE = 120
HELDOUT_PER_INTENT = 10

INTENTS = [
    "refund",
    "cancel_order",
    "track_order",
    "change_address",
    "damaged_item",
    "wrong_item",
    "update_payment",
    "return_item",
]

SYSTEM = (
    "You route support tickets for Pebble & Pine, an online homeware shop. "
    "Pick exactly one intent for the customer's message:\n"
    "- refund: wants money back (double charge, overcharge, refund status).\n"
    "- cancel_order: wants to cancel an order before it ships.\n"
    "- track_order: asks where an order is or when it arrives.\n"
    "- change_address: wants to change the delivery address.\n"
    "- damaged_item: an item arrived broken or damaged.\n"
    "- wrong_item: received a different item than ordered.\n"
    "- update_payment: wants to change or fix their card or payment method.\n"
    "- return_item: wants to send back an unwanted item.\n"
    "Reply with only this JSON, no other text:\n"
    '{"intent": "<intent>", "order_id": "<order number, digits only>"}\n'
    "Use null for order_id when there is no order number."
)

# ---------------------------------------------------------------------------
# Templates. "{ref}" becomes an order reference ("order 48213", "#48213",
# "order no. 48213", ...); "{num}" becomes the bare number ("48213" or
# "#48213"). A template with neither has no order id (answer null). Small
# numbers in the text (house numbers, "20 days") are deliberate distractors:
# order ids are always 4-7 digits.
# ---------------------------------------------------------------------------

TRAFFIC_TEMPLATES = {
    "refund": [
        "I want a refund for {ref}.",
        "Can I get my money back for {ref}?",
        "Please refund {ref}, I was charged twice.",
        "You charged my card twice for {ref}. I need the extra payment refunded.",
        "When will I get the refund for {ref}? It has been two weeks.",
        "I was overcharged on {ref}, please refund the difference.",
        "Requesting a full refund on {ref}.",
        "{ref} - still waiting on my refund, where is it?",
        "I'd like the money for {ref} put back on my card.",
        "The sale price wasn't applied to {ref}. Can you refund what I overpaid?",
        "refund please, {ref}",
        "My refund for {ref} never showed up on my bank statement.",
        "Could you process a refund for {ref}? I already sent the item back last week.",
        "The coupon didn't work on {ref} so I'm owed some money back.",
        "How do I get reimbursed for {ref}?",
        "I want my money back.",
        "I was charged twice for the same purchase and need one of the payments refunded.",
        "Where is my refund? I was told it would take five days.",
        "Can you refund the shipping fee I paid? I was supposed to get free delivery.",
        "Please issue a refund to my credit card.",
    ],
    "cancel_order": [
        "Please cancel {ref}.",
        "I need to cancel {ref} before it ships.",
        "Cancel {ref}, I ordered it by mistake.",
        "Can you cancel {ref}? I found it cheaper elsewhere.",
        "I changed my mind about {ref}, please cancel it.",
        "Is it too late to cancel {ref}?",
        "I accidentally placed {ref} twice, please cancel the duplicate.",
        "{ref} - cancel it please, I don't need it anymore.",
        "Please stop {ref} from being shipped, I want to cancel.",
        "I want to cancel an order, the number is {num}.",
        "cancell {ref} asap",
        "How do I cancel {ref}? I can't find the button in my account.",
        "Could you cancel {ref} and make sure I'm not charged?",
        "The delivery date on {ref} is too late for me, so please cancel it.",
        "Please cancel {ref}, I picked the wrong size when ordering.",
        "I want to cancel the order I just placed.",
        "Can I still cancel an order that hasn't shipped yet?",
        "Please cancel my most recent order, I ordered the wrong colour.",
        "I accidentally ordered the same thing twice, please cancel one of them.",
        "cancel my order please",
    ],
    "track_order": [
        "Where is {ref}?",
        "Can you tell me the status of {ref}?",
        "{ref} hasn't arrived yet. Where is it?",
        "When will {ref} be delivered?",
        "Has {ref} shipped yet?",
        "I need the tracking number for {ref}.",
        "My package for {ref} is late, can you check where it is?",
        "Tracking for {ref} hasn't updated in four days.",
        "Any update on {ref}? It was supposed to arrive Monday.",
        "What's the estimated delivery date for {ref}?",
        "wheres {ref}?? been waiting forever",
        "Could you check on the delivery of {ref}, please?",
        "I ordered a week ago and {ref} still says processing. When does it ship?",
        "Which courier is delivering {ref}?",
        "Where is my package?",
        "My order hasn't arrived yet, can you check on it?",
        "How can I track my order?",
        "It's been ten days and my parcel still isn't here.",
        "When will my stuff arrive?",
        "Can you send me the tracking link for my order?",
    ],
    "change_address": [
        "I need to change the shipping address for {ref}.",
        "Can you update the delivery address on {ref}? I moved.",
        "Please send {ref} to my new address instead: 14 Elm Street, Leeds.",
        "I entered the wrong address for {ref}, can I fix it?",
        "{ref} is going to my old apartment. Please change it to my work address.",
        "Wrong postcode on {ref}, can you correct it?",
        "I typed my street name wrong on {ref}. Can you update the address?",
        "Is it possible to change where {ref} is delivered?",
        "Please redirect {ref} to my parents' house.",
        "I'm moving next week, so please change the delivery address for {ref}.",
        "Update adress on {ref} please",
        "Can I have {ref} shipped to a different address?",
        "The apartment number is missing from the address on {ref}.",
        "For {ref}, please change the address to 221 Baker Street, London.",
        "I need to change my shipping address.",
        "How do I update the delivery address on an order I already placed?",
        "I moved, please update my address for my order.",
        "I put the wrong address on my order, can you fix it?",
        "Can you change the address my package is going to?",
        "Please ship to my office instead of my home.",
    ],
    "damaged_item": [
        "{ref} arrived damaged.",
        "The vase in {ref} came broken.",
        "My item from {ref} arrived cracked.",
        "The box for {ref} was crushed and the lamp inside is broken.",
        "The mug I got in {ref} has a big chip in it.",
        "Everything in {ref} was soaked and ruined when it arrived.",
        "The chair from {ref} arrived with a broken leg.",
        "{ref} came today but the glass is shattered.",
        "I received {ref} and the mirror is cracked.",
        "The frame in {ref} was bent during shipping.",
        "My package ({ref}) arrived damaged, what should I do?",
        "The plates from {ref} came in pieces.",
        "the teapot in {ref} is brokn",
        "Part of {ref} arrived scratched and dented.",
        "My order arrived damaged.",
        "The item I received is broken.",
        "The package was crushed and the contents are damaged.",
        "Two of the glasses I got were cracked.",
        "My lamp arrived with a broken shade.",
        "Things in my delivery were smashed.",
    ],
    "wrong_item": [
        "I received the wrong item in {ref}.",
        "{ref} contained something I didn't order.",
        "I ordered a blue blanket but {ref} had a red one.",
        "You sent me the wrong size in {ref}.",
        "This isn't what I ordered. {ref} has a different product inside.",
        "{ref} came with someone else's items.",
        "The item in {ref} doesn't match what I bought.",
        "I got a set of towels instead of the curtains I ordered in {ref}.",
        "Wrong product delivered for {ref}.",
        "I recieved the wrong thing in {ref}",
        "{ref} has a clock I never ordered instead of my lamp.",
        "The colour of the rug in {ref} is not the one I picked.",
        "You shipped me a different model than I ordered in {ref}.",
        "I opened {ref} and it's the wrong item entirely.",
        "I got the wrong item.",
        "The package I received has someone else's order in it.",
        "You sent me the wrong colour.",
        "This is not the product I ordered.",
        "I ordered a large and received a small.",
        "My delivery contained a completely different item.",
    ],
    "update_payment": [
        "I need to update the payment method for {ref}.",
        "My card was declined on {ref}. Can I use a different card?",
        "Please change the card on {ref}, the old one expired.",
        "Can I switch {ref} to PayPal instead of my credit card?",
        "The payment for {ref} failed. How do I update my card details?",
        "I want to pay for {ref} with a different card.",
        "My bank blocked the charge for {ref}. Can I enter a new card?",
        "{ref} says payment pending, I need to update my billing info.",
        "My card got replaced by the bank, please update it for {ref}.",
        "paymnet failed on {ref}, how do i change card",
        "Can I use a gift card to pay for {ref} instead?",
        "How do I change the payment method on {ref}?",
        "How do I update my credit card?",
        "My card expired, I need to add a new one to my account.",
        "I want to change my payment method.",
        "Please remove my old card and use my new debit card.",
        "My payment keeps getting declined, how can I update my card details?",
        "Can I switch from credit card to PayPal for future orders?",
        "I need to update my billing details.",
        "The card on file is wrong, how do I replace it?",
    ],
    "return_item": [
        "I want to return an item from {ref}.",
        "How do I send back {ref}? It doesn't fit.",
        "Can I get a return label for {ref}?",
        "I'd like to return the curtains from {ref}, they're too short.",
        "{ref} - I want to send it back, I don't like the colour.",
        "Is {ref} still within the return window?",
        "Please email me a return shipping label for {ref}.",
        "I changed my mind about the lamp in {ref} and want to return it.",
        "What's your return policy? I want to send back {ref}.",
        "I need to return part of {ref}.",
        "how do i retrun {ref}",
        "The sofa cover in {ref} doesn't fit my couch. Can I return it?",
        "Where do I drop off a return for {ref}?",
        "Can I return {ref} even though I opened the box?",
        "How do I return an item?",
        "I want to send back something I bought last week.",
        "Can I get a return label?",
        "The rug doesn't go with my room, I'd like to return it.",
        "What is the return window for items?",
        "I need to return a gift I received.",
    ],
}

# Different wording and sentence structure from the traffic templates (not
# just other order ids): synonyms the traffic never uses ("void", "call off",
# "reroute", "ETA", "bounced", "hand back"), other sentence shapes, other items.
HELDOUT_TEMPLATES = {
    "refund": [
        "Money still hasn't come back to my account for {ref}, what's going on?",
        "There are two identical charges from your shop on my statement for {ref}; please reverse one.",
        "{ref}: I paid for express delivery but it came standard. I'd like that fee back.",
        "Is it possible to be reimbursed? The promo code was ignored at checkout.",
        "Checking on the status of reimbursement for {ref}.",
        "Kindly credit the amount of {ref} back to my Visa.",
        "You billed me more than the listed price. I expect the overcharge returned.",
        "It's been ten business days since you approved my refund and I see nothing. {ref}",
        "Reverse what you took for {ref}, store credit is no good to me.",
        "how long do refunds usually take to land? asking about {ref}",
    ],
    "cancel_order": [
        "Before this goes out, I'd rather not go through with {ref}. Can you call it off?",
        "Scrap {ref} entirely please.",
        "{ref} was placed by my kid without asking. Can it be voided?",
        "Am I able to withdraw a purchase I made ten minutes ago?",
        "Don't ship {ref}. I no longer want it.",
        "I'd like {ref} annulled while it's still processing.",
        "Hold on, I regret buying this. Stop the order before dispatch.",
        "Is there a way to back out of {ref}? Nothing has shipped.",
        "Could {ref} be called off? Got the same lamp at a store nearby.",
        "no longer need the stuff in {ref}, please void it",
    ],
    "track_order": [
        "Any idea when {ref} will reach me?",
        "The courier site shows nothing for {ref}. Is it actually on its way?",
        "{ref} status check, please.",
        "Was {ref} dispatched or is it still in the warehouse?",
        "I've been waiting since last Tuesday for my parcel. ETA?",
        "Give me an arrival estimate on {ref}.",
        "What's going on with my delivery? Nothing has come.",
        "Is {ref} out for delivery today?",
        "Curious how far along {ref} is in transit.",
        "can u find out where {ref} is stuck",
    ],
    "change_address": [
        "I've relocated. Could {ref} go to the new place instead?",
        "My flat number got left off {ref}, can you add it before it goes out?",
        "Different destination needed for {ref}: 9 Harbour Road, Bristol.",
        "The house number on my order is wrong. How can I correct it?",
        "{ref}: swap the delivery location to my office, please.",
        "Can the recipient address on {ref} be edited?",
        "I won't be living at that address anymore and need the parcel to go elsewhere.",
        "Accidentally used my old street for {ref}. Please amend it.",
        "Reroute {ref} to my sister's place please.",
        "need to fix the postcode for {num}",
    ],
    "damaged_item": [
        "Opened {ref} and found the bowl split down the middle.",
        "Looks like the courier dropped {ref}; the kettle is dented all over.",
        "The rug in {ref} has a big tear in it straight out of the packaging.",
        "What arrived was in pieces. The ceramic didn't survive transit.",
        "{ref}: the shelf came snapped in half.",
        "Water got into the parcel and warped the wooden tray from {ref}.",
        "Just unwrapped my candle holder and it's chipped.",
        "Unboxed {ref}, lid is cracked and one handle fell off.",
        "There's a dent and scratches on the toaster from {ref}.",
        "the glass on my new picture frame is smashed, {ref}",
    ],
    "wrong_item": [
        "Expected cushions, found a doormat. {ref}",
        "{ref}: the label says queen duvet but it's a single.",
        "Whoever packed {ref} mixed it up with another customer's purchase.",
        "The thing in my box isn't anything I picked out.",
        "Got green plates rather than the white ones from {ref}.",
        "Not my stuff in {ref}, there's a pet bed instead of a pillow.",
        "Mix-up with my delivery: a totally unrelated product showed up.",
        "In {ref} I was sent the small pan, but I paid for the large.",
        "Pretty sure {ref} got swapped, these aren't the candles I chose.",
        "the kettle that came in {ref} is a different brand than listed",
    ],
    "update_payment": [
        "Checkout for {ref} bounced; I'd like to try another card.",
        "Swap the Visa on {ref} for my Mastercard please.",
        "Bank issued me fresh card numbers. Where do I put them in?",
        "{ref} is stuck awaiting payment. Can I pay with Apple Pay?",
        "My saved card is out of date.",
        "Charge {ref} to a different account, not the one on file.",
        "Is there a way to edit the card details attached to {ref}?",
        "Transaction got rejected for {ref}, want to retry with new card info",
        "Could I settle {ref} using store credit rather than my card?",
        "Replace my expired debit card on my profile please.",
    ],
    "return_item": [
        "This throw isn't for me. What's the process to ship {ref} back to you?",
        "{ref} doesn't suit the room; can you send a prepaid label?",
        "Not keeping the stool from {ref}. How do I get it back to you?",
        "Do you accept unwanted items back after 20 days?",
        "Where should I mail {ref} back to?",
        "The cushions are fine, I just don't like them. Sending them back is possible? {ref}",
        "What are the steps to hand back something I no longer want?",
        "I'd like to bring {ref} back to a store instead of posting it.",
        "{ref} arrived fine but it's too big for my desk, I'll be returning it.",
        "can i still send {ref} back if i threw away the packaging",
    ],
}

# Order reference forms, (weight, format). Shared by traffic and held-out: the
# held-out set tests new phrasings, not new id notations.
REF_FORMS = [
    (3, "order {n}"),
    (2, "order #{n}"),
    (2, "#{n}"),
    (2, "order no. {n}"),
    (2, "order number {n}"),
    (1, "order ID {n}"),
    (2, "my order {n}"),
    (1, "my order #{n}"),
]
NUM_FORMS = [(2, "{n}"), (1, "#{n}")]

TRAFFIC_GREETINGS = [(6, ""), (1, "Hi,"), (1, "Hello,"), (1, "Hey,"), (1, "Hi there,"),
                     (1, "Good morning,"), (1, "Hello team,"), (1, "Hi support,")]
TRAFFIC_CLOSINGS = [(6, ""), (1, "Thanks!"), (1, "Thank you."), (1, "Thanks in advance."),
                    (1, "Please help."), (1, "thx"), (1, "Cheers."), (1, "Appreciate it."),
                    (1, "Thanks so much!")]
HELDOUT_GREETINGS = [(6, ""), (1, "Hiya."), (1, "Dear support,"), (1, "Greetings."),
                     (1, "Evening!")]
HELDOUT_CLOSINGS = [(6, ""), (1, "Ta."), (1, "Regards, Sam"), (1, "Much obliged."),
                    (1, "Kind regards.")]

TYPO_RATE = 0.08       # share of traffic messages given one extra machine typo
LOWERCASE_RATE = 0.05  # share of traffic messages typed all lowercase
MAX_SHARED_5GRAMS = 1  # assertion bound: 5-grams a held-out message may share with one traffic message
NEAR_DUP_JACCARD = 0.8 # curation's default near-duplicate threshold (word 3-shingles)
VARY_JACCARD = 0.7     # renderings of one template stay below this (margin for MinHash's estimate)


def weighted(rng, choices):
    total = sum(w for w, _ in choices)
    x = rng.random() * total
    for w, v in choices:
        x -= w
        if x < 0:
            return v
    return choices[-1][1]


def has_id(template):
    return "{ref}" in template or "{num}" in template


def answer_of(intent, order_id):
    # Canonical form: json.dumps' default separators, ", " and ": ".
    return json.dumps({"intent": intent, "order_id": order_id})


def item(message, intent, order_id):
    return {
        "user": message,
        "answer": answer_of(intent, order_id),
        "checks": [{"type": "json_fields", "fields": {"intent": intent, "order_id": order_id}}],
    }


def capitalise_first(s):
    return s[:1].upper() + s[1:]


def add_typo(rng, text):
    """Swaps two adjacent interior letters of one alphabetic word of 5+ letters."""
    words = text.split(" ")
    candidates = [i for i, w in enumerate(words) if len(w) >= 5 and w.isalpha()]
    if not candidates:
        return text
    i = rng.choice(candidates)
    w = words[i]
    j = rng.randrange(1, len(w) - 2)
    if w[j] == w[j + 1]:
        return text
    words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
    return " ".join(words)


def render(rng, template, order_id, greetings, closings, noisy):
    ref = weighted(rng, REF_FORMS).format(n=order_id) if order_id else ""
    num = weighted(rng, NUM_FORMS).format(n=order_id) if order_id else ""
    body = template.replace("{ref}", ref).replace("{num}", num)
    greeting = weighted(rng, greetings)
    closing = weighted(rng, closings)
    if ref:
        # A reference that starts a sentence starts with a capital.
        if body.startswith(ref):
            body = capitalise_first(body)
        body = re.sub(r"([.?!] )" + re.escape(ref), lambda m: m.group(1) + capitalise_first(ref), body)
    if greeting:
        first = body.split(" ", 1)[0]
        if greeting.endswith(",") and not (first == "I" or first.startswith("I'")):
            body = body[:1].lower() + body[1:]
        body = f"{greeting} {body}"
    if closing:
        if body[-1:].isalnum():
            body += "."
        body = f"{body} {closing}"
    if noisy:
        if rng.random() < TYPO_RATE:
            body = add_typo(rng, body)
        if rng.random() < LOWERCASE_RATE:
            body = body.lower()
    return body


def words(text):
    """The curation's normalisation: lowercase, non-alphanumerics to spaces."""
    return "".join(c.lower() if c.isalnum() else " " for c in text).split()


def masked_words(text):
    # Order ids (and any number) as one token, so overlap counts wording only.
    return ["<n>" if w.isdigit() else w for w in words(text)]


def ngrams(ws, n):
    return {tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)}


def shingles3(text):
    ws = words(text)
    return ngrams(ws, 3) if len(ws) > 3 else {tuple(ws)}


def jaccard(a, b):
    return len(a & b) / len(a | b) if a or b else 1.0


class Ids:
    """Unique order ids, 4-7 digits, no leading zero; never reused."""

    def __init__(self, rng):
        self.rng = rng
        self.used = set()

    def new(self):
        while True:
            length = self.rng.choice([4, 5, 5, 6, 6, 7])
            n = str(self.rng.randrange(10 ** (length - 1), 10 ** length))
            if n not in self.used and not any(n in u or u in n for u in self.used):
                self.used.add(n)
                return n


def template_split(rng):
    """(traffic, held-out) templates per intent, and the greetings and
    closings each side is rendered with."""
    if not MIXED:
        return (TRAFFIC_TEMPLATES, HELDOUT_TEMPLATES,
                (TRAFFIC_GREETINGS, TRAFFIC_CLOSINGS), (HELDOUT_GREETINGS, HELDOUT_CLOSINGS))
    traffic, heldout = {}, {}
    for intent in INTENTS:
        pool = TRAFFIC_TEMPLATES[intent] + HELDOUT_TEMPLATES[intent]
        held = set(rng.sample(range(len(pool)), HELDOUT_PER_INTENT))
        traffic[intent] = [t for k, t in enumerate(pool) if k not in held]
        heldout[intent] = [t for k, t in enumerate(pool) if k in held]
    sides = (TRAFFIC_GREETINGS + HELDOUT_GREETINGS[1:], TRAFFIC_CLOSINGS + HELDOUT_CLOSINGS[1:])
    return traffic, heldout, sides, sides


def build():
    rng = random.Random(SEED)
    traffic_templates, heldout_templates, (tg, tc), (hg, hc) = template_split(rng)
    ids = Ids(rng)
    per_intent = CYCLES * CHATS_PER_CYCLE // len(INTENTS)
    assert per_intent * len(INTENTS) == CYCLES * CHATS_PER_CYCLE
    assert CHATS_PER_CYCLE % len(INTENTS) == 0

    # --- traffic -----------------------------------------------------------
    traffic_by_intent = {}
    seen_messages = set()
    for intent in INTENTS:
        templates = traffic_templates[intent]
        assert len(templates) >= 12, intent
        assert len(set(templates)) == len(templates), intent
        order = list(range(len(templates)))
        rng.shuffle(order)
        uses = [order[k % len(order)] for k in range(per_intent)]
        items = []
        previous = {}  # template index -> shingle sets of its earlier renderings
        for t in uses:
            template = templates[t]
            for attempt in range(200):
                order_id = ids.new() if has_id(template) else None
                msg = render(rng, template, order_id, tg, tc, True)
                sh = shingles3(msg)
                if msg in seen_messages:
                    continue
                if any(jaccard(sh, o) >= VARY_JACCARD for o in previous.get(t, [])):
                    continue
                break
            else:
                raise AssertionError(f"could not vary template {template!r}")
            seen_messages.add(msg)
            previous.setdefault(t, []).append(sh)
            items.append((t, item(msg, intent, order_id)))
        rng.shuffle(items)
        traffic_by_intent[intent] = items

    # Blocks of CHATS_PER_CYCLE with the same number of each intent.
    k = CHATS_PER_CYCLE // len(INTENTS)
    traffic, traffic_templates_used = [], set()
    for b in range(CYCLES):
        block = []
        for intent in INTENTS:
            for t, it in traffic_by_intent[intent][b * k:(b + 1) * k]:
                block.append(it)
                traffic_templates_used.add((intent, traffic_templates[intent][t]))
        rng.shuffle(block)
        traffic.extend(block)
    traffic_ids = set(ids.used)

    # --- held-out ----------------------------------------------------------
    heldout = []
    for intent in INTENTS:
        templates = heldout_templates[intent]
        assert len(templates) == HELDOUT_PER_INTENT, intent
        for template in templates:
            order_id = ids.new() if has_id(template) else None
            msg = render(rng, template, order_id, hg, hc, False)
            heldout.append(item(msg, intent, order_id))
    rng.shuffle(heldout)
    return traffic, heldout, (traffic_templates, heldout_templates, traffic_templates_used), traffic_ids


def order_id_of(it):
    return it["checks"][0]["fields"]["order_id"]


def intent_of(it):
    return it["checks"][0]["fields"]["intent"]


def validate(traffic, heldout, templates, traffic_ids):
    traffic_templates, heldout_templates, traffic_templates_used = templates
    stats = {}
    # Shapes and answers.
    for it in traffic + heldout:
        parsed = json.loads(it["answer"])
        assert parsed == it["checks"][0]["fields"], it
        assert it["answer"] == answer_of(parsed["intent"], parsed["order_id"])
        assert parsed["intent"] in INTENTS
        oid = parsed["order_id"]
        if oid is None:
            assert not re.search(r"\d{4,}", it["user"]), it
        else:
            assert re.fullmatch(r"[1-9][0-9]{3,6}", oid), it
            assert re.findall(r"\d{4,}", it["user"]) == [oid], it

    # Traffic: distinct, and balanced in every block of CHATS_PER_CYCLE.
    assert len(traffic) == CYCLES * CHATS_PER_CYCLE
    assert len({it["user"] for it in traffic}) == len(traffic)
    for b in range(CYCLES):
        block = traffic[b * CHATS_PER_CYCLE:(b + 1) * CHATS_PER_CYCLE]
        counts = {i: 0 for i in INTENTS}
        for it in block:
            counts[intent_of(it)] += 1
        assert set(counts.values()) == {CHATS_PER_CYCLE // len(INTENTS)}, counts
    for intent in INTENTS:
        used = {t for i, t in traffic_templates_used if i == intent}
        assert used == set(traffic_templates[intent]), intent

    # Held-out: 10 per intent, templates disjoint from traffic's, messages and
    # order ids never in traffic.
    assert len(heldout) == HELDOUT_PER_INTENT * len(INTENTS)
    for intent in INTENTS:
        assert sum(intent_of(it) == intent for it in heldout) == HELDOUT_PER_INTENT
    all_traffic_templates = {t for ts in traffic_templates.values() for t in ts}
    norm_traffic_templates = {" ".join(masked_words(t)) for t in all_traffic_templates}
    for ts in heldout_templates.values():
        for t in ts:
            assert t not in all_traffic_templates, t
            assert " ".join(masked_words(t)) not in norm_traffic_templates, t
    traffic_msgs = {it["user"] for it in traffic}
    traffic_norm = {" ".join(masked_words(m)) for m in traffic_msgs}
    for it in heldout:
        assert it["user"] not in traffic_msgs, it
        assert " ".join(masked_words(it["user"])) not in traffic_norm, it
        oid = order_id_of(it)
        if oid is not None:
            assert oid not in traffic_ids
            assert not any(oid in m for m in traffic_msgs), oid

    # Word 5-gram overlap, order ids masked.
    t5 = [ngrams(masked_words(it["user"]), 5) for it in traffic]
    all_t5 = set().union(*t5)
    max_shared, worst, shared_any, total_h5 = 0, None, 0, 0
    for it in heldout:
        h = ngrams(masked_words(it["user"]), 5)
        total_h5 += len(h)
        shared_any += len(h & all_t5)
        for j, tg in enumerate(t5):
            s = len(h & tg)
            if s > max_shared:
                max_shared, worst = s, (it["user"], traffic[j]["user"], sorted(h & tg))
    stats["max_shared_5grams"] = max_shared
    stats["worst_pair"] = worst
    stats["heldout_5grams"] = total_h5
    stats["heldout_5grams_in_traffic"] = shared_any
    # Only the held-out set written apart promises new vocabulary.
    assert MIXED or max_shared <= MAX_SHARED_5GRAMS, worst

    # Closest pair by 3-shingle Jaccard (the curation's near-duplicate measure).
    h3 = [shingles3(it["user"]) for it in heldout]
    tr3 = [shingles3(it["user"]) for it in traffic]
    stats["max_jaccard3_heldout_traffic"] = max(jaccard(a, b) for a in h3 for b in tr3)
    within = [jaccard(a, b) for a, b in itertools.combinations(tr3, 2)]
    stats["max_jaccard3_within_traffic"] = max(within)
    stats["traffic_pairs_at_or_over_0.8"] = sum(x >= NEAR_DUP_JACCARD for x in within)
    assert stats["traffic_pairs_at_or_over_0.8"] == 0
    assert stats["max_jaccard3_within_traffic"] < VARY_JACCARD

    stats["traffic_null"] = sum(order_id_of(it) is None for it in traffic)
    stats["heldout_null"] = sum(order_id_of(it) is None for it in heldout)
    stats["system_words"] = sum(bool(re.search(r"[A-Za-z]", w)) for w in SYSTEM.split())
    assert 60 <= stats["system_words"] <= 120, stats["system_words"]
    return stats


def scenario(traffic, heldout):
    heldout_from = (
        "Held-out phrasings come from templates drawn at random from the same pool as the "
        "traffic's and never used in traffic. Generated by scenarios/make_support_routing.py "
        "--mixed."
        if MIXED else
        "Held-out phrasings come from templates never used in traffic. Generated by "
        "scenarios/make_support_routing.py."
    )
    return {
        "name": NAME,
        "description": (
            "Support-ticket routing for Pebble & Pine, a fictional homeware shop: reply with only "
            '{"intent", "order_id"} JSON. Eight intents; order ids of 4-7 digits in varied '
            "forms and positions, or none (null). " + heldout_from
        ),
        "team": "shop-support",
        "system": SYSTEM,
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "route",
                "strict": True,
                "schema": {
                    "type": "object",
                    "properties": {
                        "intent": {"type": "string", "enum": INTENTS},
                        "order_id": {"type": ["string", "null"]},
                    },
                    "required": ["intent", "order_id"],
                    "additionalProperties": False,
                },
            },
        },
        "max_tokens": 40,
        "temperature": 0,
        "cycles": CYCLES,
        "chats_per_cycle": CHATS_PER_CYCLE,
        "correction_probability": 0.5,
        "raters": [
            {"name": "careful", "share": 0.75, "behaviour": "honest"},
            {"name": "noisy", "share": 0.1, "behaviour": "noisy", "flip_probability": 0.3},
            {"name": "contrarian", "share": 0.075, "behaviour": "inverted"},
            {"name": "thumbs-up-spammer", "share": 0.075, "behaviour": "always_up"},
        ],
        "users_per_rater": 3,
        "second_rater_share": 0.5,
        "traffic": traffic,
        "heldout": heldout,
    }


def main():
    traffic, heldout, used, traffic_ids = build()
    stats = validate(traffic, heldout, used, traffic_ids)
    doc = scenario(traffic, heldout)
    assert abs(sum(r["share"] for r in doc["raters"]) - 1.0) < 1e-9
    text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"

    if "--check" in sys.argv[1:]:
        on_disk = OUT.read_text(encoding="utf-8") if OUT.exists() else None
        if on_disk != text:
            print(f"{OUT} is out of date; run {Path(__file__).name}", file=sys.stderr)
            sys.exit(1)
        print(f"{OUT} is up to date")
        return
    OUT.write_text(text, encoding="utf-8")

    print(f"wrote {OUT}")
    print(f"intents: {len(INTENTS)} ({', '.join(INTENTS)})")
    print(f"traffic: {len(traffic)} messages from "
          f"{sum(len(v) for v in used[0].values())} templates, "
          f"{stats['traffic_null']} without an order id; "
          f"{CYCLES} blocks of {CHATS_PER_CYCLE}, {CHATS_PER_CYCLE // len(INTENTS)} per intent each")
    print(f"heldout: {len(heldout)} messages from "
          f"{sum(len(v) for v in used[1].values())} disjoint templates, "
          f"{stats['heldout_null']} without an order id")
    print(f"system prompt: {stats['system_words']} words")
    print(f"word 5-grams (ids masked): max shared between a held-out and a traffic message = "
          f"{stats['max_shared_5grams']}; held-out 5-grams found anywhere in traffic = "
          f"{stats['heldout_5grams_in_traffic']}/{stats['heldout_5grams']}")
    if stats["worst_pair"]:
        h, t, g = stats["worst_pair"]
        print(f"  worst pair: {h!r} / {t!r}: {[' '.join(x) for x in g]}")
    print(f"word 3-shingle Jaccard: max held-out vs traffic = "
          f"{stats['max_jaccard3_heldout_traffic']:.2f}; max within traffic = "
          f"{stats['max_jaccard3_within_traffic']:.2f} "
          f"({stats['traffic_pairs_at_or_over_0.8']} pairs >= {NEAR_DUP_JACCARD})")


if __name__ == "__main__":
    main()
