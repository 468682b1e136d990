// kmsctl card provision | split: write the startup secret, or Shamir shares of it, to operator
// cards (any PKCS#11 token; OpenSC for smart cards). They talk to the cards, and kmsd never
// sees the secret; but a re-split while a kmsd of this configuration is unsealed needs that
// kmsd's approval ("card_split", asked for and spent over its unseal socket; see
// daemon/startup/card_split_gate.hpp). The secret is read without echo or from a 0600 file
// and never printed. The card writing itself (write_secret_to_cards) is shared with
// `kmsctl dr prepare --cards`.
#include <iostream>
#include <optional>
#include <span>

#include <nlohmann/json.hpp>

#include "cli/commands/common.hpp"
#include "daemon/startup/card_split_gate.hpp"
#include "daemon/startup/operator_card.hpp"
#include "daemon/startup/quorum.hpp"
#include "daemon/startup/secret_source.hpp"
#include "daemon/startup/unseal_socket.hpp"

namespace kmsd::cli {

namespace {

// Below this length a secret split k-of-n could be guessed by whoever holds k-1 shares (the
// share digests let them test guesses; see daemon/startup/quorum.hpp).
constexpr std::size_t kShortSecret = 16;

struct CardTarget {
  std::string config;
  std::string module;
  std::string label;
  std::string socket;  // kmsd's unseal socket (--socket, else server.unseal_socket of --config)
};

// Fills module, label and socket from --config when the flags do not give them.
Status resolve_target(CardTarget& t) {
  if (!t.config.empty() && (t.module.empty() || t.label.empty() || t.socket.empty())) {
    auto cfg = load_config(t.config);
    if (!cfg) return make_error(ErrorCode::kConfig, "cannot read " + t.config);
    if (t.module.empty()) t.module = cfg->startup.card_module.string();
    if (t.label.empty()) t.label = cfg->startup.card_label;
    if (t.socket.empty()) t.socket = cfg->server.unseal_socket.string();
  }
  if (t.label.empty()) t.label = config::StartupConfig{}.card_label;
  if (t.module.empty())
    return make_error(ErrorCode::kInvalidArgument,
                      "name the cards' PKCS#11 module with --module PATH (or --config with "
                      "startup.card_module)");
  return {};
}

// The startup secret: from a 0600 file, or typed twice without echo.
Result<SecretBytes> new_secret(const std::string& file) {
  if (!file.empty()) return startup::read_secret_from_file(file);
  KMSD_ASSIGN_OR_RETURN(
      auto a, startup::read_secret_from_terminal("Startup secret (the key token's user PIN): "));
  KMSD_ASSIGN_OR_RETURN(auto b, startup::read_secret_from_terminal("Repeat the startup secret: "));
  if (!constant_time_equal(a.span(), b.span()))
    return make_error(ErrorCode::kInvalidArgument, "the two entries differ; nothing was written");
  return a;
}

Result<SecretBytes> card_pin(const std::vector<std::string>& files, std::size_t i,
                             const std::string& what) {
  if (i < files.size()) return startup::read_secret_from_file(files[i]);
  if (!files.empty())
    return make_error(ErrorCode::kInvalidArgument,
                      "--pin-files lists " + std::to_string(files.size()) +
                          " files; give one per card, in the order of the cards");
  return startup::read_secret_from_terminal("Insert " + what + " and type its PIN: ");
}

// ---- provision ----

struct ProvisionArgs {
  CardTarget target;
  std::string card;
  std::string secret_file;
  std::string pin_file;
  bool force = false;
};

int run_provision(ProvisionArgs a) {
  if (auto st = resolve_target(a.target); !st.ok()) return fail(st.error());
  auto secret = new_secret(a.secret_file);
  if (!secret.ok()) return fail(secret.error());
  CardWritePlan plan;
  plan.module = a.target.module;
  plan.label = a.target.label;
  plan.cards = {a.card};
  if (!a.pin_file.empty()) plan.pin_files = {a.pin_file};
  plan.force = a.force;
  auto written = write_secret_to_cards(plan, *secret);
  if (!written.ok()) return fail(written.error());
  std::cout << "kmsd reads it with startup.source = \"card\" and card_uri naming this card.\n";
  return kOk;
}

// ---- split ----

struct SplitArgs {
  CardTarget target;
  std::string request;  // an approved card_split request of the running kmsd
  unsigned k = 0;
  std::vector<std::string> cards;
  std::vector<std::string> pin_files;
  std::string secret_file;
  std::vector<std::string> from_cards;
  std::vector<std::string> from_pin_files;
  bool force = false;
};

// The current secret read from the old cards: a quorum's shares (k of them) or one card
// holding the whole secret.
Result<SecretBytes> secret_from_cards(const SplitArgs& a) {
  startup::ShareCollector shares(std::chrono::hours(24));
  for (std::size_t i = 0; i < a.from_cards.size(); ++i) {
    const std::string& uri = a.from_cards[i];
    KMSD_ASSIGN_OR_RETURN(auto pin, card_pin(a.from_pin_files, i, "the current card " + uri));
    KMSD_ASSIGN_OR_RETURN(auto value,
                          startup::read_card_object({a.target.module, uri}, pin, a.target.label));
    auto parsed = startup::parse_share(value.span());
    if (!parsed.ok()) {
      if (a.from_cards.size() == 1) return value;  // a card holding the whole secret
      return parsed.error().context(uri);
    }
    KMSD_ASSIGN_OR_RETURN(auto progress, shares.add(value.span()));
    std::cerr << "read " << uri << ": " << progress.text() << "\n";
    if (progress.complete()) return shares.take_secret();
  }
  auto p = shares.progress();
  return make_error(ErrorCode::kInvalidArgument, "the current cards gave " +
                                                     (p ? p->text() : std::string("no shares")) +

                                                     "; name at least k of them with --from-cards");
}

// ---- the approval gate ----

// One request over kmsd's unseal socket; the reply, or its error with the daemon's code.
Result<nlohmann::json> ask_kmsd(const std::string& socket, const std::string& op,
                                const nlohmann::json& fields) {
  KMSD_ASSIGN_OR_RETURN(auto line, startup::unseal_request(socket, op, nullptr, fields.dump()));
  auto j = nlohmann::json::parse(line, nullptr, false);
  if (!j.is_object()) return make_error(ErrorCode::kInternal, "kmsd sent an unreadable reply");
  if (j.value("ok", false)) return j;
  ErrorCode code = ErrorCode::kFailedPrecondition;
  for (ErrorCode c : {ErrorCode::kInvalidArgument, ErrorCode::kNotFound,
                      ErrorCode::kPermissionDenied, ErrorCode::kFailedPrecondition,
                      ErrorCode::kUnavailable, ErrorCode::kStore, ErrorCode::kInternal}) {
    if (j.value("code", std::string()) == to_string(c)) code = c;
  }
  return make_error(code, "kmsd: " + j.value("error", std::string("request refused")));
}

// Whether a running kmsd of this configuration is unsealed, so that the split needs its
// approval. Nobody answering on the socket, or a sealed kmsd: a local split, as always.
bool split_needs_approval(const SplitArgs& a) {
  if (a.target.socket.empty()) {
    std::cerr << "kmsctl: note: no --config or --socket: cannot check whether a running kmsd "
                 "must approve this split\n";
    return false;
  }
  auto status = startup::unseal_request(a.target.socket, "status");
  if (!status.ok()) {
    std::cerr << "kmsctl: note: no kmsd answers on " << a.target.socket
              << ": a local split, no approval needed\n";
    return false;
  }
  auto j = nlohmann::json::parse(*status, nullptr, false);
  const std::string state = j.is_object() ? j.value("state", std::string()) : "";
  if (state == "sealed") {
    std::cerr << "kmsctl: note: kmsd is sealed: no approval needed\n";
    return false;
  }
  return true;
}

int run_split(SplitArgs a) {
  if (auto st = resolve_target(a.target); !st.ok()) return fail(st.error());
  const auto n = static_cast<unsigned>(a.cards.size());
  if (a.k < 2 || a.k > n || n > 255)
    return fail(make_error(
        ErrorCode::kInvalidArgument,
        "a quorum needs 2 <= --quorum-k <= number of --cards (" + std::to_string(n) + ") <= 255"));
  CardWritePlan cards;
  cards.module = a.target.module;
  cards.label = a.target.label;
  cards.cards = a.cards;
  cards.pin_files = a.pin_files;
  cards.k = a.k;
  cards.force = a.force;
  if (auto st = check_card_plan(cards); !st.ok()) return fail(st.error());
  const startup::SplitPlan plan{a.k, a.cards, a.target.module, a.target.label};
  const bool gated = split_needs_approval(a);
  if (gated && a.request.empty()) {
    auto r = ask_kmsd(a.target.socket, "card_split_request", {{"plan", plan.to_json()}});
    if (!r.ok()) return fail(r.error());
    const std::string id = r->value("request", std::string());
    std::cout << "kmsd is unsealed: re-splitting the startup secret needs the approval of "
              << r->value("required", 1) << " administrator(s) (card_split).\n"
              << "Request " << id << " is waiting. Administrators approve it with\n"
              << "  kmsctl request approve " << id << "\n"
              << "then run this command again with --request " << id
              << " (same cards, same --quorum-k). No card was written.\n";
    return kAuth;
  }
  if (!gated && !a.request.empty())
    std::cerr << "kmsctl: note: --request " << a.request << " is not used\n";
  Result<SecretBytes> secret =
      a.from_cards.empty() ? new_secret(a.secret_file) : secret_from_cards(a);
  if (!secret.ok()) return fail(secret.error());
  if (gated) {
    // Spent now, just before the first card is written.
    auto begun = ask_kmsd(a.target.socket, "card_split_begin",
                          {{"request", a.request}, {"plan", plan.to_json()}});
    if (!begun.ok()) {
      if (begun.error().code == ErrorCode::kPermissionDenied) {
        std::cerr << "kmsctl: " << begun.error().message << "\n";
        return kAuth;
      }
      return fail(begun.error());
    }
  }
  auto report_end = [&](bool ok, const std::string& quorum, const std::string& why) {
    if (!gated) return true;
    auto done = ask_kmsd(a.target.socket, "card_split_done",
                         {{"request", a.request}, {"ok", ok}, {"quorum", quorum}, {"error", why}});
    if (!done.ok())
      std::cerr << "kmsctl: kmsd did not record the end of the split: " << done.error().message
                << "\n";
    return done.ok();
  };
  auto written = write_secret_to_cards(cards, *secret);
  if (!written.ok()) {
    report_end(false, "", written.error().message);
    return fail(written.error());
  }
  std::cout << "kmsd reads them with startup.source = \"quorum\"; operators present their cards "
               "one at a time with `kmsctl unseal --card URI`.\n";
  return report_end(true, written->quorum_id, "") ? kOk : kFailed;
}

void add_target_options(CLI::App* cmd, CardTarget& t) {
  cmd->add_option("--module", t.module,
                  "PKCS#11 module of the cards (default: startup.card_module of --config)");
  cmd->add_option("--label", t.label,
                  "label of the data object on the cards (default: startup.card_label, else "
                  "kms-startup-secret)");
  cmd->add_option("-c,--config", t.config, "kmsd configuration file, for the defaults above");
}

// Whether the cards of P already hold SECRET exactly as P would write it: the quorum id
// (hex; "" for one card) if so. PINS holds the PINs read so far; the missing ones are read.
std::optional<std::string> already_written(const CardWritePlan& p, const SecretBytes& secret,
                                           std::vector<SecretBytes>& pins) {
  const auto n = static_cast<unsigned>(p.cards.size());
  std::vector<startup::Share> shares;
  for (unsigned i = 0; i < n; ++i) {
    if (pins.size() == i) {
      auto pin = card_pin(p.pin_files, i, "operator card " + p.cards[i]);
      if (!pin.ok()) return std::nullopt;
      pins.push_back(std::move(*pin));
    }
    auto value = startup::read_card_object({p.module, p.cards[i]}, pins[i], p.label);
    if (!value.ok()) return std::nullopt;
    if (p.k < 2) {
      if (value->size() != secret.size() || !constant_time_equal(value->span(), secret.span()))
        return std::nullopt;
      return std::string();
    }
    auto share = startup::parse_share(value->span());
    if (!share.ok() || share->k != p.k || share->n != n || share->index != i + 1 ||
        !share->digest_matches() ||
        (!shares.empty() && share->quorum_id != shares.front().quorum_id))
      return std::nullopt;
    shares.push_back(std::move(*share));
  }
  auto rebuilt = startup::combine_shares(std::span<const startup::Share>(shares.data(), p.k));
  if (!rebuilt.ok() || rebuilt->size() != secret.size() ||
      !constant_time_equal(rebuilt->span(), secret.span()))
    return std::nullopt;
  return shares.front().quorum_id_hex();
}

}  // namespace

Status check_card_plan(const CardWritePlan& p) {
  const auto n = p.cards.size();
  if (n == 0)
    return make_error(ErrorCode::kInvalidArgument, "name the operator cards with --cards URI");
  if (p.k < 2 && n != 1)
    return make_error(
        ErrorCode::kInvalidArgument,
        std::to_string(n) + " cards need a quorum: give 2 <= --quorum-k <= number of cards");
  if (p.k >= 2 && (p.k > n || n > 255))
    return make_error(
        ErrorCode::kInvalidArgument,
        "a quorum needs 2 <= --quorum-k <= number of --cards (" + std::to_string(n) + ") <= 255");
  if (!p.pin_files.empty() && p.pin_files.size() != n)
    return make_error(ErrorCode::kInvalidArgument,
                      "give one card PIN file per card, in the order of --cards");
  return {};
}

Result<CardsWritten> write_secret_to_cards(const CardWritePlan& p, const SecretBytes& secret) {
  KMSD_TRY(check_card_plan(p));
  const auto n = static_cast<unsigned>(p.cards.size());
  const bool quorum = p.k >= 2;
  CardsWritten out;
  std::vector<SecretBytes> blobs;
  if (quorum) {
    if (secret.size() < kShortSecret)
      std::cerr << "kmsctl: warning: the startup secret is " << secret.size()
                << " bytes; with a quorum, whoever holds k-1 cards could test guesses of a short "
                   "secret. Give the key token a long random user PIN (16 characters or more).\n";
    KMSD_ASSIGN_OR_RETURN(auto shares, startup::split_secret(secret, p.k, n));
    out.quorum_id = shares.front().quorum_id_hex();
    for (const auto& s : shares) blobs.push_back(startup::encode_share(s));
  }
  std::vector<SecretBytes> pins;
  std::vector<startup::ForbiddenToken> written;
  for (unsigned i = 0; i < n; ++i) {
    const std::string what = quorum ? "operator card " + std::to_string(i + 1) + " of " +
                                          std::to_string(n) + " (" + p.cards[i] + ")"
                                    : "the operator card " + p.cards[i];
    auto pin = card_pin(p.pin_files, i, what);
    if (!pin.ok()) return pin.error().context(what);
    pins.push_back(std::move(*pin));
    startup::CardReport report;
    auto st = startup::write_card_object({p.module, p.cards[i]}, pins[i], p.label,
                                         quorum ? blobs[i] : secret, p.force, &report, written);
    if (!st.ok()) {
      if (i == 0 && p.accept_existing && !p.force && st.error().code == ErrorCode::kAlreadyExists) {
        if (auto held = already_written(p, secret, pins)) {
          std::cout << (quorum ? "the cards already hold a complete quorum " + *held +
                                     " of this secret; nothing was written"
                               : "the card already holds this secret; nothing was written")
                    << "\n";
          return CardsWritten{*held, true};
        }
      }
      std::string msg = what + ": " + st.error().message;
      if (i > 0 && quorum)
        msg += "; cards 1.." + std::to_string(i) + " already hold shares of the new quorum " +
               out.quorum_id.substr(0, 8) +
               ", which is incomplete and unusable; run the command again with --force once "
               "every card is at hand";
      return make_error(st.error().code, msg);
    }
    written.push_back({report.label, report.serial});
    if (quorum)
      std::cout << "share " << (i + 1) << " of " << n << " written to card '" << report.label
                << "' (serial " << report.serial << ")\n";
    else
      std::cout << "The startup secret is on operator card '" << report.label << "' (serial "
                << report.serial << ") as the private data object '" << p.label << "'.\n";
  }
  if (quorum)
    std::cout << "Quorum " << out.quorum_id << ": any " << p.k << " of these " << n
              << " cards rebuild the startup secret.\n";
  return out;
}

void add_card_commands(CLI::App& app, Commands& commands) {
  auto* card = app.add_subcommand("card", "write the startup secret to operator cards");
  card->require_subcommand(1);

  auto* prov = card->add_subcommand(
      "provision", "write the startup secret to one operator card (startup.source = \"card\")");
  auto& p = commands.add<ProvisionArgs>(prov, run_provision);
  prov->add_option("--card", p.card, "the card, as a pkcs11: URI (token=, serial=, ...)")
      ->required();
  add_target_options(prov, p.target);
  prov->add_option("--secret-file", p.secret_file,
                   "0600 file holding the startup secret (default: prompt twice, no echo)");
  prov->add_option("--pin-file", p.pin_file,
                   "0600 file holding the card's PIN (default: prompt, no echo)");
  prov->add_flag("--force", p.force, "replace a secret already on the card");

  auto* split = card->add_subcommand(
      "split",
      "split the startup secret k-of-n, one share per operator card (startup.source = "
      "\"quorum\"); also re-splits to a new set of cards");
  auto& s = commands.add<SplitArgs>(split, run_split);
  split->add_option("--quorum-k,-k", s.k, "shares needed to unseal (2..number of cards)")
      ->required();
  split
      ->add_option("--cards", s.cards,
                   "the new cards, one pkcs11: URI each (repeat one URI to swap cards in a "
                   "single reader)")
      ->required();
  add_target_options(split, s.target);
  split->add_option("--socket", s.target.socket,
                    "kmsd's unseal socket (default: server.unseal_socket of --config); a kmsd "
                    "unsealed there must approve the split");
  split->add_option("--request", s.request,
                    "the approved card_split request (kmsctl prints its id when kmsd is "
                    "unsealed and asks for approval)");
  split->add_option("--pin-files", s.pin_files,
                    "0600 files holding each new card's PIN, in the order of --cards (default: "
                    "prompt per card)");
  auto* sf = split->add_option("--secret-file", s.secret_file,
                               "0600 file holding the startup secret (default: prompt twice)");
  split
      ->add_option("--from-cards", s.from_cards,
                   "read the current secret from these cards instead: k cards of the old "
                   "quorum, or the one card holding it")
      ->excludes(sf);
  split->add_option("--from-pin-files", s.from_pin_files,
                    "0600 files holding the PINs of --from-cards, in order (default: prompt)");
  split->add_flag("--force", s.force, "replace secrets or shares already on the new cards");
}

}  // namespace kmsd::cli
