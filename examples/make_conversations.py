"""Generate examples/conversations.jsonl: small, synthetic customer-support chats for fine-tuning.

Deterministic (seeded `random.Random`, no external data), so the committed file can be checked
against a fresh run. OpenAI chat format, one JSON object per line:

    {"messages": [{"role": "system", ...}?, {"role": "user", ...}, {"role": "assistant", ...}, ...],
     "tools": [...]?, "topics": ["billing"]}

    python examples/make_conversations.py [--out PATH] [--n-per-topic N] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path(__file__).resolve().parent / "conversations.jsonl"
DEFAULT_N_PER_TOPIC = 125
DEFAULT_SEED = 20240611
TOOL_CALL_SHARE = 0.10
MAX_WORDS = 120

TOPICS = ("billing", "shipping", "returns", "tech-support")

# --- slot values -----------------------------------------------------------------------------

NAMES = ["Ada", "Ben", "Chloe", "Diego", "Emma", "Farah", "Gus", "Hana", "Ivan", "Jade", "Kofi",
         "Lena", "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Vera",
         "Wen", "Yusuf", "Zoe"]
COMPANIES = ["Northwind Outfitters", "Brightleaf Home", "Cobalt Cloud", "Pebble Goods", "Lumen Audio",
             "Harbor & Pine", "Quokka Apps", "Tidewater Supply"]
PRODUCTS = ["wireless headphones", "running shoes", "coffee grinder", "desk lamp", "hiking backpack",
            "phone case", "yoga mat", "blender", "smart watch", "winter jacket", "mechanical keyboard",
            "water bottle", "rain boots", "bluetooth speaker", "office chair", "electric kettle"]
CARRIERS = ["UPS", "FedEx", "DHL", "USPS"]
CITIES = ["Austin", "Denver", "Portland", "Chicago", "Boston", "Seattle", "Atlanta", "Phoenix",
          "Toronto", "Vancouver"]
COUNTRIES = ["Canada", "Mexico", "the UK", "Germany", "Japan", "Australia", "Ireland", "Brazil"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
PLANS = ["Basic", "Plus", "Pro", "Team"]
PLATFORMS = ["my iPhone", "my Android phone", "Windows", "my Mac", "Chrome", "Firefox", "my iPad"]
FEATURES = ["the reports page", "settings", "the calendar view", "file uploads", "the dashboard",
            "search"]
LOGIN_ERRORS = ['"Invalid credentials"', '"Session expired"', '"Error E-1042"', '"Error E-2007"',
                '"Too many attempts"']
HTTP_ERRORS = ["502 errors", "503 errors", "timeouts", "429 rate-limit errors"]

GREETINGS = ["", "", "Hi! ", "Hello! ", "Hey there. ", "Good morning. ", "Hi, quick question. "]
ACKS = ["", "", "Thanks for reaching out. ", "Happy to help. ", "Thanks for the details. "]
SORRY = ["Sorry about that. ", "I'm sorry for the trouble. ", "Apologies for the hassle. ",
         "That's frustrating, sorry. "]

SYSTEM_PROMPTS = [
    "You are a friendly support assistant for {company}. Keep answers short and concrete.",
    "You are {company}'s customer support agent. Be concise, polite and accurate.",
    "You help customers of {company}. Answer in two or three sentences.",
    "You are a support assistant for {company}. If you are unsure, offer to escalate to a human.",
]
SYSTEM_PROMPT_SHARE = 0.4

# --- scenarios: (opener, answer, follow-ups) per topic -----------------------------------------
# Templates use str.format slots filled by `_slots`. Follow-ups are (user, assistant) pairs.

SCENARIOS: dict[str, list[dict[str, Any]]] = {
    "billing": [
        {"user": ["I was charged twice for my {plan} plan this month, {amount} each time.",
                  "Why do I see two charges of {amount} on my card?"],
         "assistant": ["{sorry}The second charge of {amount} is a pending authorization from a failed "
                       "retry. It will drop off within 3-5 business days. If it's still there after "
                       "that, reply here and we'll refund it directly."],
         "followups": [("Will my account be suspended meanwhile?",
                        "No, your account stays fully active while this clears."),
                       ("Can you confirm that by email?",
                        "Done. A confirmation is on its way to the email address on file.")]},
        {"user": ["How do I update the credit card on my account?",
                  "My card expired. Where do I add a new one?",
                  "I need to change my payment method."],
         "assistant": ["{ack}Go to Settings > Billing > Payment methods, click \"Add card\", then make "
                       "the new card your default. You can remove the old one afterwards.",
                       "{ack}Open Settings > Billing and choose \"Payment methods\". Add the new card "
                       "and set it as default; the next charge on {month} 1 will use it."],
         "followups": [("Can I pay with PayPal instead?",
                        "Yes, PayPal is available on the same page under \"Add payment method\"."),
                       ("Will I be charged right away?",
                        "No. Adding a card doesn't trigger a charge; billing stays on your usual date.")]},
        {"user": ["Can I get a copy of my invoice for {month}?",
                  "Where can I download last month's invoice? I need it for {month} expenses.",
                  "My accountant needs the {month} invoice as a PDF."],
         "assistant": ["{ack}Invoices are under Settings > Billing > History. Click the {month} entry "
                       "and choose \"Download PDF\".",
                       "{ack}You'll find it in Billing > History. Each month has a \"Download PDF\" "
                       "link, and {month} should be near the top."],
         "followups": [("Can the invoice show my company name?",
                        "Yes. Add it under Billing > Invoice details and re-download the PDF."),
                       ("Can you just email it to me?",
                        "Sure, I've sent the {month} invoice to the email address on your account.")]},
        {"user": ["I want to downgrade from {plan_hi} to {plan_lo}.",
                  "How do I switch my plan from {plan_hi} to {plan_lo}?"],
         "assistant": ["{ack}Change it under Settings > Billing > Plan. The downgrade takes effect at "
                       "the end of your billing period, so you keep {plan_hi} features until {month} "
                       "{day}.",
                       "{ack}Pick {plan_lo} under Billing > Plan. You won't be charged the {plan_hi} "
                       "price again, and any unused time is credited to your next invoice."],
         "followups": [("Will I lose my data?",
                        "No. Your data is kept; only {plan_hi}-only features become read-only."),
                       ("Can I upgrade again later?",
                        "Anytime. Upgrades apply immediately and are prorated.")]},
        {"user": ["I forgot to cancel and got charged {amount} for the renewal. Can I get a refund?",
                  "I was billed {amount} for a renewal I didn't want. Refund please?"],
         "assistant": ["{sorry}Since the renewal was only {n} days ago and the account hasn't been "
                       "used since, you qualify for a full refund of {amount}. I've submitted it; "
                       "expect it within 5-10 business days.",
                       "I understand. Renewals can be refunded within 14 days, and yours was {n} days "
                       "ago, so I've refunded the {amount}. You'll see it on your statement in about "
                       "a week."],
         "followups": [("Is my subscription cancelled now too?",
                        "Yes, it's cancelled and you won't be billed again."),
                       ("How do I avoid this next year?",
                        "Turn off auto-renew under Billing > Plan, or we'll email you 7 days before.")]},
        {"user": ["How do I add my company's VAT number to invoices?",
                  "Our invoices need a tax ID. Where do I enter it?"],
         "assistant": ["{ack}Go to Billing > Invoice details and fill in the \"Tax ID\" field. It "
                       "appears on every invoice issued after you save it.",
                       "{ack}Enter it under Billing > Invoice details. Future invoices will show it, "
                       "and I can reissue the {month} invoice with it if you need."],
         "followups": [("Does that remove VAT from the price?",
                        "For valid EU business VAT numbers, yes: reverse charge applies from the next invoice."),
                       ("Please reissue {month}'s invoice.",
                        "Done. The updated {month} invoice is in Billing > History.")]},
        {"user": ["My payment keeps getting declined, but the card works everywhere else.",
                  "Why was my card declined? I have enough funds."],
         "assistant": ["{sorry}Declines usually come from the bank's fraud check on online or foreign "
                       "charges. Please approve the charge in your banking app or call your bank, then "
                       "retry under Billing > Payment methods.",
                       "{sorry}Our processor got a \"do not honor\" response, which comes from the "
                       "bank. Ask them to allow charges from {company}, then click \"Retry payment\"."],
         "followups": [("How long before my account is paused?",
                        "You have a 7-day grace period, so nothing changes before {weekday} next week."),
                       ("Can I pay by bank transfer instead?",
                        "Yes, on annual plans. I can switch you and send transfer details by email.")]},
    ],
    "shipping": [
        {"user": ["Where is my order {order_id}? It was supposed to arrive {weekday}.",
                  "My order {order_id} still hasn't arrived. Any update?",
                  "Order {order_id} is late. What's going on?"],
         "assistant": ["{sorry}Order {order_id} shipped with {carrier} and is in transit. Delays of "
                       "1-2 days are common right now; you'll get an email as soon as tracking updates.",
                       "{sorry}{carrier} has order {order_id} at their {city} hub. It should reach you "
                       "within two business days."],
         "followups": [("Can I get the tracking number?",
                        "Yes, it's in your shipping confirmation email and under Orders > {order_id}."),
                       ("What if it doesn't come by then?",
                        "Let us know and we'll send a replacement or refund you, whichever you prefer.")]},
        {"user": ["Can I change the shipping address for order {order_id}? I moved to {city}.",
                  "I entered the wrong address on order {order_id}. Can you fix it?"],
         "assistant": ["{ack}If it hasn't shipped yet, yes: go to Orders > {order_id} > Edit address. "
                       "If the button is greyed out, the package is already with the carrier.",
                       "{ack}Order {order_id} hasn't left the warehouse, so I can update it. Please "
                       "send the full new address and I'll change it right away."],
         "followups": [("It already shipped. What now?",
                        "You can redirect it from {carrier}'s tracking page, usually for free."),
                       ("Will this delay delivery?",
                        "By a day at most; the new estimate will be in your confirmation email.")]},
        {"user": ["How much is express shipping to {city}?",
                  "What are my shipping options to {city}?",
                  "How fast can you deliver to {city}?"],
         "assistant": ["{ack}Express to {city} costs {amount} and arrives in 1-2 business days. "
                       "Standard shipping is free over $50 and takes 3-5 business days.",
                       "{ack}For {city} we offer standard (3-5 business days, free over $50) and "
                       "express (1-2 business days, {amount})."],
         "followups": [("Do you deliver on weekends?",
                        "Express orders can arrive on Saturdays; standard delivery is weekdays only."),
                       ("If I order today, when would express arrive?",
                        "Orders placed before 2 pm ship the same day, so {weekday} at the latest.")]},
        {"user": ["Do you ship to {country}?",
                  "Can I order from {country}?",
                  "Is international shipping to {country} available?"],
         "assistant": ["{ack}Yes, we ship to {country}. Delivery takes 7-14 business days, and import "
                       "duties are collected on delivery.",
                       "{ack}We do. Orders to {country} go out with {carrier} and usually arrive within "
                       "two weeks. Duties and taxes are shown at checkout."],
         "followups": [("How much does it cost?",
                        "International shipping is a flat {amount}, free on orders over $150."),
                       ("Can I track it the whole way?",
                        "Yes, tracking works end to end, including the local carrier in {country}.")]},
        {"user": ["Tracking says order {order_id} was delivered, but I don't have it.",
                  "My package shows as delivered yesterday but it's not here."],
         "assistant": ["{sorry}Please check with neighbours and around the entrance first; carriers "
                       "sometimes mark packages delivered a day early. If it's not there by tomorrow, "
                       "we'll send a replacement.",
                       "{sorry}{carrier} lists it as left at the front door. If you can't find it "
                       "within 24 hours, reply here and I'll open a claim and reship it."],
         "followups": [("It's still missing today.",
                        "Thanks for checking. I've opened a claim and a replacement ships today."),
                       ("Do I need to file a police report?",
                        "No, that's not required. We handle the claim with the carrier.")]},
        {"user": ["My package arrived damaged. The {product} box was crushed.",
                  "Order {order_id} came with a broken {product}."],
         "assistant": ["{sorry}Please send a photo of the box and the {product}. Once we have it, "
                       "we'll ship a replacement at no cost; no need to return the damaged one.",
                       "{sorry}I've arranged a replacement {product}, shipping today by express. You "
                       "can keep or recycle the damaged one."],
         "followups": [("Can I get a refund instead?",
                        "Of course. I've switched it to a full refund, back on your card in 5-10 days."),
                       ("How long will the replacement take?",
                        "It goes out by express today, so usually within 2 business days.")]},
    ],
    "returns": [
        {"user": ["How do I return the {product} I bought?",
                  "I'd like to return my {product}. What do I do?",
                  "What's the process for sending back a {product}?"],
         "assistant": ["{ack}You can return it within 30 days of delivery. Go to Orders, pick the "
                       "order, choose \"Return item\", then print the prepaid label and drop it at any "
                       "{carrier} location.",
                       "{ack}Start the return under Orders > Return item. You'll get a free {carrier} "
                       "label by email; pack the {product} and drop it off within 14 days."],
         "followups": [("Does it need the original packaging?",
                        "Not necessarily; any sturdy box works as long as the item is protected."),
                       ("Is return shipping free?",
                        "Yes, returns within 30 days are free.")]},
        {"user": ["The {product} I ordered is the wrong size. Can I exchange it?",
                  "Can I swap my {product} for a different size?"],
         "assistant": ["{ack}Yes. Choose \"Exchange\" instead of \"Return\" under Orders and pick the "
                       "new size. We ship the replacement as soon as the carrier scans your return.",
                       "{ack}Exchanges are free. Select the new size under Orders > Exchange; the new "
                       "{product} ships once your return is scanned."],
         "followups": [("What if the new size is out of stock?",
                        "Then we refund you in full, or you can pick another color."),
                       ("Can you ship the new one first?",
                        "For orders over $50, yes: we ship it now and hold a deposit until the return arrives.")]},
        {"user": ["I returned my {product} {n} days ago. When do I get my refund?",
                  "Still waiting on a refund for the {product} I sent back {n} days ago."],
         "assistant": ["Refunds are issued once the warehouse checks the item, usually 3-5 "
                       "business days after drop-off. The money then takes up to 10 days to show on "
                       "your statement.",
                       "{sorry}Your return reached our warehouse on {weekday}. The refund of {amount} "
                       "was issued today and should appear within 5-10 business days."],
         "followups": [("Will it go back to my original card?",
                        "Yes, refunds always go to the original payment method."),
                       ("Can I get store credit instead?",
                        "Sure, store credit is instant. I've switched it and sent you the code.")]},
        {"user": ["Can I still return something I bought {n_late} days ago?",
                  "It's been {n_late} days since delivery. Is a return still possible?"],
         "assistant": ["Our return window is 30 days, so {n_late} days is outside it, unfortunately. If "
                       "the item is faulty, it's still covered by the 1-year warranty and I can start "
                       "a claim.",
                       "{sorry}Standard returns close after 30 days. Since it's been {n_late} days, I can "
                       "offer store credit as a one-time exception."],
         "followups": [("It's faulty, actually. It won't turn on.",
                        "Then the warranty applies. I've opened a claim; you'll get a free return label."),
                       ("Store credit is fine.",
                        "Great, the credit is on your account now and never expires.")]},
        {"user": ["My {product} stopped working after a week.",
                  "The {product} I got last week is already broken."],
         "assistant": ["{sorry}That's covered. I can send a replacement right away, or refund you once "
                       "the return is scanned. Which would you prefer?",
                       "{sorry}Items that fail in the first 30 days are replaced for free. I've started "
                       "a replacement {product}; the return label is in your email."],
         "followups": [("A replacement, please.",
                        "Done. The new {product} ships today and tracking follows by email."),
                       ("I'd rather have my money back.",
                        "No problem. You'll get {amount} back once the carrier scans the return.")]},
        {"user": ["I received a {product} as a gift. Can I return it without a receipt?",
                  "How do gift returns work? I got a {product} I don't need."],
         "assistant": ["{ack}Yes. Enter the order number from the gift slip on our returns page. You'll "
                       "get store credit, and the giver isn't notified.",
                       "{ack}Gift returns get store credit for the price paid. Use the gift receipt "
                       "code, or give us the giver's email and we'll find the order."],
         "followups": [("There's no gift slip.",
                        "That's fine. Send the giver's name or email and I'll look up the order."),
                       ("Can I get cash instead of credit?",
                        "Gift returns are store credit only, but the credit never expires.")]},
    ],
    "tech-support": [
        {"user": ["I can't log in on {platform}. It says {login_error}.",
                  "Login fails with {login_error} on {platform}."],
         "assistant": ["{ack}Reset your password with \"Forgot password\" on the login screen. If you "
                       "still see {login_error}, sign out everywhere from the web app and try again.",
                       "{sorry}The {login_error} message usually means a stale session. Update the app, clear its "
                       "cache, then log in again."],
         "followups": [("The reset email never arrives.",
                        "Check spam, then add our address to your contacts. I've re-sent it just now."),
                       ("Still failing.",
                        "I've escalated it to our accounts team; they'll email you within a few hours.")]},
        {"user": ["The app crashes whenever I open {feature} on {platform}.",
                  "Opening {feature} on {platform} makes the app close immediately."],
         "assistant": ["{sorry}This is a known issue in version 4.{n}, and a fix ships this week. "
                       "Meanwhile, {feature} works in the web app.",
                       "{sorry}Please update to the latest version and restart {platform_short}. If it "
                       "still crashes, send the crash ID from Settings > About."],
         "followups": [("How do I find my app version?",
                        "It's under Settings > About, at the bottom of the screen."),
                       ("Will I lose anything if I reinstall?",
                        "No. Everything is synced to your account and comes back after you log in.")]},
        {"user": ["I lost my phone and can't get my two-factor codes.",
                  "My authenticator app was on my old phone. How do I log in now?"],
         "assistant": ["{ack}Use one of the backup codes you saved when you turned on two-factor. If "
                       "you don't have them, we can verify your identity and reset it, which takes "
                       "about a day.",
                       "{sorry}Log in with a backup code, then set up two-factor again on the new "
                       "phone under Security. No backup codes? I'll start an identity check."],
         "followups": [("I don't have backup codes.",
                        "No problem. I've emailed you a verification link; it resets two-factor within 24 hours."),
                       ("Can I use SMS instead?",
                        "Yes, pick SMS as your second factor under Security after you log in.")]},
        {"user": ["My data isn't syncing between {platform} and my other devices.",
                  "Changes I make on {platform} don't show up on my other devices."],
         "assistant": ["{ack}Check that both devices are signed in to the same account and that sync "
                       "is on under Settings > Sync. Then pull down to refresh.",
                       "{sorry}Sync pauses in low-power mode. Turn that off, open the app, and it "
                       "should catch up within a minute."],
         "followups": [("It's on and it still doesn't sync.",
                        "Sign out and back in on {platform_short}; that forces a full resync."),
                       ("Is there an outage?",
                        "No, all systems are operational right now.")]},
        {"user": ["How do I export my data to CSV?",
                  "Is there a way to download all my records as a spreadsheet?"],
         "assistant": ["{ack}Go to Settings > Data > Export and choose CSV. You'll get an email with a "
                       "download link when it's ready, usually within a few minutes.",
                       "{ack}Open the list you need, click the \"...\" menu and choose \"Export CSV\". "
                       "For everything at once, use Settings > Data > Export."],
         "followups": [("Can I schedule a weekly export?",
                        "Yes, on {plan} and above: Settings > Data > Scheduled exports."),
                       ("The download link expired.",
                        "Links last 24 hours. I've generated a new one and emailed it to you.")]},
        {"user": ["I'm not getting any notifications on {platform}.",
                  "Push notifications stopped working on {platform}."],
         "assistant": ["{ack}First check that notifications are allowed for the app in your system "
                       "settings, then under Settings > Notifications in the app itself.",
                       "{sorry}After an update, the system sometimes resets permissions. Re-enable "
                       "notifications for the app in system settings and restart it."],
         "followups": [("Both are turned on already.",
                        "Then log out and back in; that re-registers the device for notifications."),
                       ("Can I get email alerts instead?",
                        "Yes, switch on email alerts under Settings > Notifications.")]},
    ],
}

GENERIC_CLOSERS = [
    ("Thanks, that helps!", "You're welcome! Anything else I can help with?"),
    ("Great, thank you.", "Happy to help. Have a nice day!"),
    ("Perfect, that's all I needed.", "Glad I could help. Take care!"),
    ("OK, I'll try that.", "Sounds good. Reply here if anything else comes up."),
    ("Thanks a lot!", "My pleasure. Have a great {weekday}!"),
]

# --- tool-call flows ---------------------------------------------------------------------------

TOOLS: dict[str, dict[str, Any]] = {
    "lookup_order": {
        "type": "function",
        "function": {
            "name": "lookup_order",
            "description": "Look up an order's status, carrier, delivery date and return eligibility.",
            "parameters": {
                "type": "object",
                "properties": {"order_id": {"type": "string", "description": "Order number, e.g. A12345."}},
                "required": ["order_id"],
            },
        },
    },
    "get_invoice": {
        "type": "function",
        "function": {
            "name": "get_invoice",
            "description": "Fetch an invoice's amount, status and due date.",
            "parameters": {
                "type": "object",
                "properties": {"invoice_id": {"type": "string", "description": "Invoice number, e.g. INV-10234."}},
                "required": ["invoice_id"],
            },
        },
    },
    "check_service_status": {
        "type": "function",
        "function": {
            "name": "check_service_status",
            "description": "Current status of one of our services and any open incident.",
            "parameters": {
                "type": "object",
                "properties": {"service": {"type": "string", "enum": ["api", "web", "mobile", "sync"],
                                           "description": "Which service to check."}},
                "required": ["service"],
            },
        },
    },
}


def _tool_flow(topic: str, rng: random.Random, s: dict[str, Any]) -> tuple[str, str, dict, dict, str]:
    """(tool name, user text, arguments, result, final answer) for one tool-using conversation."""
    if topic == "billing":
        status = rng.choice(["paid", "open", "overdue"])
        user = rng.choice([f"Has invoice {s['invoice_id']} been paid?",
                           f"What's the status of invoice {s['invoice_id']}?",
                           f"Can you check invoice {s['invoice_id']} for me?"])
        result = {"invoice_id": s["invoice_id"], "amount": s["amount"], "status": status,
                  "due_date": s["date_iso"]}
        answer = {
            "paid": f"Invoice {s['invoice_id']} for {s['amount']} is paid in full. Nothing else is due.",
            "open": f"Invoice {s['invoice_id']} for {s['amount']} is open and due on {s['month']} {s['day']}.",
            "overdue": f"Invoice {s['invoice_id']} for {s['amount']} is overdue. You can pay it now "
                       "under Billing > History to avoid a pause.",
        }[status]
        return "get_invoice", user, {"invoice_id": s["invoice_id"]}, result, answer
    if topic == "shipping":
        status = rng.choice(["in_transit", "out_for_delivery", "delayed"])
        user = rng.choice([f"Where is order {s['order_id']}?",
                           f"Can you track order {s['order_id']} for me?",
                           f"Any news on my order {s['order_id']}?"])
        result = {"order_id": s["order_id"], "status": status, "carrier": s["carrier"],
                  "eta": s["date_iso"]}
        answer = {
            "in_transit": f"Order {s['order_id']} is in transit with {s['carrier']} and should arrive "
                          f"on {s['month']} {s['day']}.",
            "out_for_delivery": f"Good news: order {s['order_id']} is out for delivery with "
                                f"{s['carrier']} and arrives today.",
            "delayed": f"Order {s['order_id']} is delayed at {s['carrier']}. The new estimate is "
                       f"{s['month']} {s['day']}; sorry for the wait.",
        }[status]
        return "lookup_order", user, {"order_id": s["order_id"]}, result, answer
    if topic == "returns":
        eligible = rng.random() < 0.7
        user = rng.choice([f"Can I still return order {s['order_id']}?",
                           f"Is order {s['order_id']} eligible for a return?",
                           f"I want to send back the {s['product']} from order {s['order_id']}."])
        days = s["n"] if eligible else s["n_late"]
        result = {"order_id": s["order_id"], "items": [s["product"]], "delivered_days_ago": days,
                  "return_eligible": eligible}
        answer = (f"Yes, order {s['order_id']} was delivered {days} days ago, within the 30-day window. "
                  "Start the return under Orders > Return item." if eligible else
                  f"Order {s['order_id']} was delivered {days} days ago, past the 30-day window. If "
                  f"the {s['product']} is faulty, the warranty still covers it.")
        return "lookup_order", user, {"order_id": s["order_id"]}, result, answer
    service, problem = rng.choice([("api", f"Our integration gets {s['http_error']} from the API."),
                                   ("web", "The web dashboard won't load for our whole team."),
                                   ("sync", "Nothing has synced since this morning."),
                                   ("mobile", f"The app on {s['platform']} keeps spinning.")])
    degraded = rng.random() < 0.6
    result = {"service": service, "status": "degraded" if degraded else "operational",
              "incident": f"INC-{rng.randint(1000, 9999)}" if degraded else None}
    answer = (f"There's an open incident ({result['incident']}) affecting the {service} service. "
              "Engineers are on it; updates are posted on our status page." if degraded else
              f"The {service} service is fully operational on our side, so let's check your setup. "
              "Could you send the time and request ID of a failing attempt?")
    return "check_service_status", problem, {"service": service}, result, answer


# --- generation --------------------------------------------------------------------------------

def _slots(rng: random.Random) -> dict[str, Any]:
    plan_lo, plan_hi = sorted(rng.sample(range(len(PLANS)), 2))
    month_i = rng.randrange(12)
    day = rng.randint(1, 28)
    platform = rng.choice(PLATFORMS)
    return {
        "name": rng.choice(NAMES),
        "company": rng.choice(COMPANIES),
        "product": rng.choice(PRODUCTS),
        "carrier": rng.choice(CARRIERS),
        "city": rng.choice(CITIES),
        "country": rng.choice(COUNTRIES),
        "month": MONTHS[month_i],
        "day": day,
        "date_iso": f"2024-{month_i + 1:02d}-{day:02d}",
        "weekday": rng.choice(WEEKDAYS),
        "plan": rng.choice(PLANS),
        "plan_lo": PLANS[plan_lo],
        "plan_hi": PLANS[plan_hi],
        "platform": platform,
        "platform_short": platform.replace("my ", "your "),
        "feature": rng.choice(FEATURES),
        "login_error": rng.choice(LOGIN_ERRORS),
        "http_error": rng.choice(HTTP_ERRORS),
        "amount": f"${rng.randint(5, 399)}.{rng.choice(['00', '49', '95', '99'])}",
        "order_id": f"{rng.choice('ABCDEFGHJKLMNPRSTUVWXYZ')}{rng.randint(10000, 99999)}",
        "invoice_id": f"INV-{rng.randint(10000, 99999)}",
        "n": rng.randint(2, 12),
        "n_late": rng.randint(35, 90),
        "sorry": rng.choice(SORRY),
        "ack": rng.choice(ACKS),
    }


def _fill(template: str, slots: dict[str, Any]) -> str:
    return template.format(**slots).strip()


def _words(example: dict[str, Any]) -> int:
    return sum(len(m["content"].split()) for m in example["messages"] if m.get("content"))


def _system(rng: random.Random, slots: dict[str, Any]) -> list[dict[str, str]]:
    if rng.random() >= SYSTEM_PROMPT_SHARE:
        return []
    return [{"role": "system", "content": _fill(rng.choice(SYSTEM_PROMPTS), slots)}]


def _user_text(rng: random.Random, text: str, slots: dict[str, Any]) -> str:
    greeting = rng.choice(GREETINGS)
    if greeting and rng.random() < 0.25:
        greeting += f"This is {slots['name']}. "
    return greeting + text


def _plain_conversation(topic: str, rng: random.Random) -> dict[str, Any]:
    slots = _slots(rng)
    scenario = rng.choice(SCENARIOS[topic])
    messages = _system(rng, slots)
    messages.append({"role": "user", "content": _user_text(rng, _fill(rng.choice(scenario["user"]), slots), slots)})
    messages.append({"role": "assistant", "content": _fill(rng.choice(scenario["assistant"]), slots)})
    turns = rng.choice([1, 1, 2, 2, 3])
    followups = rng.sample(scenario["followups"], k=min(turns - 1, len(scenario["followups"])))
    if turns == 3 or (turns == 2 and rng.random() < 0.3):  # often end on a thank-you
        followups = followups[:turns - 2] + [rng.choice(GENERIC_CLOSERS)]
    for user, assistant in followups:
        messages.append({"role": "user", "content": _fill(user, slots)})
        messages.append({"role": "assistant", "content": _fill(assistant, slots)})
    return {"messages": messages, "topics": [topic]}


def _tool_conversation(topic: str, rng: random.Random) -> dict[str, Any]:
    slots = _slots(rng)
    tool, user, arguments, result, answer = _tool_flow(topic, rng, slots)
    declared = [tool] + rng.sample(sorted(set(TOOLS) - {tool}), k=rng.randint(0, 1))
    messages = _system(rng, slots)
    messages += [
        {"role": "user", "content": _user_text(rng, user, slots)},
        {"role": "assistant", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": tool, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps(result)},
        {"role": "assistant", "content": answer},
    ]
    if rng.random() < 0.5:
        closer_user, closer_assistant = rng.choice(GENERIC_CLOSERS)
        messages += [{"role": "user", "content": _fill(closer_user, slots)},
                     {"role": "assistant", "content": _fill(closer_assistant, slots)}]
    return {"messages": messages, "tools": [TOOLS[name] for name in declared], "topics": [topic]}


def generate(n_per_topic: int = DEFAULT_N_PER_TOPIC, seed: int = DEFAULT_SEED) -> list[dict[str, Any]]:
    """`n_per_topic` distinct conversations per topic, about 10% with a tool call, shuffled."""
    rng = random.Random(seed)
    examples: list[dict[str, Any]] = []
    seen: set[str] = set()
    for topic in TOPICS:
        n_tools = round(n_per_topic * TOOL_CALL_SHARE)
        with_tools = set(rng.sample(range(n_per_topic), k=n_tools))
        for i in range(n_per_topic):
            make = _tool_conversation if i in with_tools else _plain_conversation
            for _ in range(1000):
                example = make(topic, rng)
                line = to_line(example)
                if line not in seen and _words(example) <= MAX_WORDS:
                    break
            else:
                raise RuntimeError(f"could not make {n_per_topic} distinct {topic!r} conversations")
            seen.add(line)
            examples.append(example)
    rng.shuffle(examples)
    return examples


def to_line(example: dict[str, Any]) -> str:
    return json.dumps(example, ensure_ascii=False)


def render(examples: list[dict[str, Any]]) -> str:
    """The JSONL text: one conversation per line, trailing newline."""
    return "".join(to_line(example) + "\n" for example in examples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output file (default {DEFAULT_OUT.name})")
    parser.add_argument("--n-per-topic", type=int, default=DEFAULT_N_PER_TOPIC,
                        help=f"conversations per topic (default {DEFAULT_N_PER_TOPIC})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"random seed (default {DEFAULT_SEED})")
    args = parser.parse_args(argv)
    if args.n_per_topic < 1:
        parser.error("--n-per-topic must be at least 1")
    examples = generate(args.n_per_topic, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(examples), encoding="utf-8")
    print(f"wrote {len(examples)} conversations to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
