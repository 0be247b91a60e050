"""User prompts for the target model's own chat transcripts in the default corpus.

Written for this project (no dataset was copied): short factual questions, how-to tasks,
stories and poems, code requests (Python, JavaScript, SQL, shell), advice, math word problems,
opinion and ethics questions, role-play, summaries and rewrites of passages written here,
explanations, brainstorming, small talk, and prompts in several other languages.

`PROMPTS` is a list of `Prompt(category, text, lang)` tuples (`lang` is an ISO 639-1 code);
`MULTI_TURN` holds conversations that end on a user turn, so the target writes the last reply.
"""
from __future__ import annotations

from typing import NamedTuple


class Prompt(NamedTuple):
    category: str
    text: str
    lang: str = "en"


def _cat(category: str, texts: list[str], lang: str = "en") -> list[Prompt]:
    return [Prompt(category, t, lang) for t in texts]


FACTUAL = _cat("factual", [
    "What is the tallest mountain in Africa, and roughly how high is it?",
    "Why does the Moon always show the same face to Earth?",
    "Who built the first European printing press with movable metal type, and when?",
    "How many bones are in the adult human body?",
    "What is the difference between a virus and a bacterium?",
    "Which planet in our solar system has the longest day?",
    "What causes the seasons on Earth?",
    "What language is spoken in Brazil, and why is it not Spanish?",
    "What does DNA stand for, and what does it do in a cell?",
    "When did people first land on the Moon, and who were they?",
    "At roughly what temperature does water boil at the top of Mount Everest?",
    "Name three rivers that flow through more than one country.",
    "What is the main ingredient in traditional hummus?",
    "How does a rainbow form?",
    "What was the Silk Road?",
    "How fast does light travel in a vacuum?",
    "Which organ in the human body produces insulin?",
    "What is the difference between weather and climate?",
    "Who wrote the novel Pride and Prejudice, and when was it published?",
    "What is the largest desert in the world? I have heard it is not the Sahara.",
    "How do bees turn nectar into honey?",
    "What is a black hole?",
    "Why is the sky blue during the day but red and orange at sunset?",
    "What is the capital of Australia? A lot of people get this one wrong.",
    "How long does sunlight take to reach Earth?",
    "What do red blood cells do?",
    "What does the Pythagorean theorem say?",
    "What are the states of matter, and is there one beyond solid, liquid and gas?",
    "Why do cats purr?",
    "What did the Rosetta Stone help scholars do?",
    "How does a vaccine train the immune system?",
    "What is inflation, in economics?",
    "Which chemical element has the symbol Fe?",
    "What is the Great Barrier Reef made of?",
    "How do ocean tides work?",
    "How can you tell an alligator from a crocodile?",
    "About how many people live on Earth, and how has that changed since 1900?",
    "Why do we have leap years?",
    "What happened at the Battle of Hastings?",
    "What is the deepest point in the ocean?",
    "Why do onions make people cry when they cut them?",
    "How did the ancient Egyptians build the pyramids, as far as historians know?",
])

HOWTO = _cat("howto", [
    "How do I boil an egg so the yolk stays a little soft?",
    "How can I get rid of fruit flies in my kitchen?",
    "What is the easiest way to start a vegetable garden on a small balcony?",
    "How do I fix a flat tire on a bicycle?",
    "How should I prepare for an interview for an entry-level office job?",
    "How do I write a good cover letter?",
    "How can I make my phone battery last longer during the day?",
    "How do I clean a cast iron pan without ruining it?",
    "What are the steps to bake a simple loaf of bread at home?",
    "How do I set up a monthly budget?",
    "How do I get a coffee stain out of a white shirt?",
    "How can I learn to type faster without looking at the keyboard?",
    "How do I tie a bowline knot?",
    "How can I get my sleep back on track after flying across several time zones?",
    "How do I repot a houseplant that has outgrown its pot?",
    "How do I make a good cup of pour-over coffee?",
    "What is a good way to memorize vocabulary in a new language?",
    "How do I back up the photos on my laptop?",
    "How do I write a clear email asking my manager for a day off?",
    "How do I unclog a bathroom sink without harsh chemicals?",
    "How can I start running if I have never exercised regularly?",
    "How do I fold a paper airplane that flies far?",
    "What is the safest way to thaw frozen chicken?",
    "How should I organize a small closet?",
    "How do I give constructive feedback to a coworker?",
    "How can I make a simple tomato sauce from scratch?",
    "How do I prepare a five-minute presentation for my class?",
    "How do I pick a ripe watermelon at the market?",
    "How do I teach my puppy to sit?",
    "How do I hang a picture frame so that it is straight?",
    "What should I do if I think my email account has been hacked?",
    "How do I start composting kitchen scraps at home?",
    "How do I write a haiku? Explain the rules and give a few tips.",
    "How can I work out a 15% tip quickly in my head?",
    "How do I plan a three-day city trip on a small budget?",
    "How do I get started with watercolor painting?",
])

STORY = _cat("story", [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Tell me a bedtime story about a small dragon who is afraid of the dark.",
    "Write a very short science fiction story set on a space station where the coffee machine has broken.",
    "Write a story in exactly five sentences about a lost umbrella.",
    "Write a fable about a tortoise who wants to learn to fly, and end it with a moral.",
    "Write the opening paragraph of a mystery novel set in a small mountain village.",
    "Write a short story about two strangers who have to share a table in a crowded cafe.",
    "Tell a funny story about a robot learning to cook pancakes.",
    "Write a story about a girl who can hear what plants are thinking.",
    "Write a short adventure story about a map hidden inside an old library book.",
    "Write a story in which the main character is a city bus.",
    "Write a short ghost story that is more sad than scary.",
    "Write a story about a grandmother teaching her grandson to fish.",
    "Write a short fairy tale about a king who banned all music from his kingdom.",
    "Write a story that begins: \"The snow had been falling for three days when the knock came.\"",
    "Write a story about an astronaut who misses the smell of rain.",
    "Write a short story about a baker whose cakes accidentally grant wishes.",
    "Tell me a story about a fox and a crow who go into business together.",
    "Write a short story told by an old pair of hiking boots.",
    "Write a story about a time traveler who can only ever jump five minutes into the future.",
    "Write a short story about a village where it has not rained for a year.",
])

POEM = _cat("poem", [
    "Write a haiku about autumn leaves.",
    "Write a short poem about the ocean at night.",
    "Write a limerick about a cat who loves cheese.",
    "Write a four-line rhyming poem about Monday mornings.",
    "Write a poem about friendship that never uses the word friend.",
    "Write a free-verse poem about a city waking up.",
    "Write a sonnet about a garden in winter.",
    "Write a short poem for my sister's birthday card.",
    "Write three haiku about a thunderstorm.",
    "Write a poem in praise of the humble potato.",
    "Write a short poem about missing home.",
    "Write an acrostic poem on the word STARS.",
    "Write a funny poem about a programmer who cannot find a bug.",
    "Write a poem about the first warm day of spring.",
    "Write a lullaby for a baby owl.",
    "Write a short poem about an old bridge over a river.",
])

CODE_PYTHON = _cat("code_python", [
    "Write a Python function that checks whether a string is a palindrome, ignoring spaces and case.",
    "Write Python code that counts how often each word appears in a text file.",
    "How do I read a CSV file in Python and compute the average of one column?",
    "Write a Python function that returns the n-th Fibonacci number without recursion.",
    "Explain the difference between a list and a tuple in Python, with a short example.",
    "Write a Python script that adds today's date to the name of every .txt file in a folder.",
    "What does the yield keyword do in Python? Show a small example.",
    "Write a Python class for a bank account with deposit and withdraw methods.",
    "How do I remove duplicates from a Python list while keeping the original order?",
    "Write a Python function that merges two sorted lists into one sorted list.",
    "Fix this Python code: for i in range(10) print(i)",
    "How do I handle a FileNotFoundError in Python?",
    "Write a list comprehension that squares only the even numbers from 1 to 20.",
    "Write a Python function that checks whether a number is prime.",
    "How do I make an HTTP GET request in Python using only the standard library?",
    "Write a Python function that returns the most common character in a string.",
])

CODE_JS = _cat("code_js", [
    "Write a JavaScript function that reverses a string.",
    "What is the difference between let, const and var in JavaScript?",
    "Write JavaScript that changes a button's label when it is clicked.",
    "How do I fetch JSON from an API in JavaScript with async and await?",
    "Write a JavaScript function that returns the largest number in an array.",
    "Explain what a Promise is in JavaScript in simple terms.",
    "Write a JavaScript snippet that counts down from 10 to 0, printing one number per second.",
    "How do I sort an array of objects by their age property in JavaScript?",
])

CODE_SQL = _cat("code_sql", [
    "Given tables customers(id, name) and orders(id, customer_id, amount), write a SQL query for the ten customers who spent the most.",
    "What is the difference between INNER JOIN and LEFT JOIN in SQL?",
    "Write a SQL statement that creates a table of books with a title, an author and a publication year.",
    "Write a SQL query that counts the employees in each department.",
    "How do I find duplicate email addresses in a users table with SQL?",
    "Write a SQL query that returns all orders placed in the last 30 days.",
    "What is a primary key in a database, and why does it matter?",
    "Write a SQL query that returns the second highest salary in an employees table.",
])

CODE_SHELL = _cat("code_shell", [
    "Write a bash command that finds every file larger than 100 MB in my home directory.",
    "How do I count the lines of every .py file in a directory from the shell?",
    "Write a shell script that backs up a folder into a compressed archive with the date in its name.",
    "What does chmod 755 do?",
    "How do I search for a word inside all the files in a folder on Linux?",
    "Write a bash loop that prints the numbers 1 to 5.",
    "How can I see which process is listening on port 8080 on Linux?",
    "How do I rename many files at once in bash, replacing spaces with underscores?",
])

ADVICE = _cat("advice", [
    "I have trouble focusing when I work from home. Any tips?",
    "My friend forgot my birthday and I feel hurt. Should I say something?",
    "I get very nervous speaking in public. How can I become more comfortable?",
    "What should I think about before adopting a dog?",
    "I want to switch careers into programming at 35. Is it too late?",
    "How can I spend less on groceries without eating badly?",
    "I procrastinate on everything. Where do I even start?",
    "My roommate never does the dishes. How do I bring it up without a fight?",
    "What habits help you stay healthy when you sit at a desk all day?",
    "I just moved to a new city and don't know anyone. How can I make friends?",
    "How do I choose between two job offers?",
    "I feel buried under emails. How should I manage my inbox?",
    "What should I pack for a week-long hiking trip?",
    "How can I help my child enjoy reading?",
    "I keep forgetting to drink enough water. Any tricks?",
    "How do I politely say no when someone asks me for a favor I can't do?",
    "I start university next month. What advice would you give me?",
    "How can I become a better listener?",
    "I made a mistake at work and my boss doesn't know yet. What should I do?",
    "How do I stay motivated while learning a musical instrument?",
    "How do I prepare financially for having a baby?",
    "My elderly father lives alone and seems lonely. How can I help from far away?",
    "What are good ways to deal with stress before an exam?",
    "Should I rent or buy a home? Which factors matter most?",
    "How can I cut down my screen time in the evenings?",
])

MATH = _cat("math", [
    "A train leaves at 2:15 pm and travels 180 km at 60 km/h. What time does it arrive?",
    "Maria buys 3 notebooks at $2.50 each and a pen for $1.20, and pays with a $10 bill. How much change does she get?",
    "A rectangle has a perimeter of 30 cm and its length is twice its width. What are its dimensions?",
    "If 5 workers can paint a fence in 6 hours, how long would 3 workers take at the same rate?",
    "A shirt costs $40 and is 25% off. What is the sale price?",
    "What is the sum of all whole numbers from 1 to 100?",
    "A recipe needs 3 eggs for 12 cookies. How many eggs do I need for 30 cookies?",
    "Tom is three times as old as his daughter. In 12 years he will be twice as old as she is. How old are they now?",
    "A car uses 6 liters of fuel per 100 km. How much fuel does a 450 km trip need?",
    "If I invest $1,000 at 5% interest compounded yearly, how much will I have after 3 years?",
    "A bag holds 4 red marbles and 6 blue marbles. If I draw one at random, what is the chance it is red?",
    "Solve for x: 3x + 7 = 25.",
    "A pizza is cut into 8 equal slices. Sam eats 3 and Lee eats 2. What fraction of the pizza is left?",
    "The average of four numbers is 15. Three of them are 10, 12 and 20. What is the fourth?",
    "A 500-liter tank already holds 140 liters and fills at 20 liters per minute. How long until it is full?",
    "How many minutes are there in a week?",
    "A square garden has an area of 64 square meters. How much fencing goes around it?",
    "Two cyclists start 90 km apart and ride toward each other at 20 km/h and 25 km/h. When do they meet?",
    "A class of 28 students has 4 more girls than boys. How many boys are there?",
    "A phone's price goes up 10% and then down 10%. Is it back to the original price? Explain.",
    "What is 15% of 240?",
    "A 5-meter ladder leans against a wall with its foot 3 meters from the wall. How high does it reach?",
    "A market sells apples at 3 for $1. How much do 21 apples cost?",
    "Convert 72 degrees Fahrenheit to Celsius and show the steps.",
    "A movie starts at 7:40 pm and runs 2 hours 35 minutes. When does it end?",
    "I read 18 pages a day. How many days will a 400-page book take me?",
])

OPINION = _cat("opinion", [
    "Is it ever okay to lie to protect someone's feelings?",
    "Should primary schools stop giving homework? Give arguments for both sides.",
    "What are the pros and cons of a four-day working week?",
    "Is it ethical to keep animals in zoos?",
    "Should people be allowed to bring their dogs into restaurants?",
    "Has social media made people more connected or less?",
    "Is it fair for companies to use customer data to personalize ads?",
    "What matters more in a leader: honesty or competence?",
    "Should voting be compulsory?",
    "If you found a wallet with cash and no ID, what would be the right thing to do?",
    "Is it better to be a generalist or a specialist in your career?",
    "Should cities make public transport free?",
    "Is it wrong to download a book that is out of print but still under copyright?",
    "Do video games do teenagers more good or more harm?",
    "Should a self-driving car protect its passengers or pedestrians first?",
    "Is it okay to eat meat? Present several viewpoints fairly.",
    "What makes a good apology?",
    "Should school uniforms be required?",
    "Is space exploration worth its cost while there are so many problems on Earth?",
    "Should newspapers publish articles written by AI?",
])

ROLEPLAY = _cat("roleplay", [
    "Pretend you are a tour guide in ancient Rome and welcome me to the city.",
    "You are a pirate captain. Explain to your newest crew member what their duties are.",
    "Act as a friendly librarian and recommend me a book for a rainy weekend.",
    "Pretend to be a medieval knight writing a letter home to his mother.",
    "You are a barista in a busy coffee shop. Take my order and make some small talk.",
    "Act as a job interviewer and ask me your first three questions for a marketing position.",
    "Pretend you are a cat explaining why you knocked the glass off the table.",
    "You are a park ranger. Tell a group of hikers the rules of the trail.",
    "Act like a sports commentator describing a snail race.",
    "Pretend you are a wise old oak tree talking to a young sapling.",
    "You are a customer service agent, and I am calling because my package never arrived.",
    "Play a detective questioning a suspect about a missing birthday cake.",
    "Pretend you are a chef on a cooking show making a simple salad.",
    "You are an alien visiting Earth for the first time. Describe a supermarket.",
    "Act as my personal trainer and give me a pep talk before my workout.",
])

SUMMARY = _cat("summary", [
    "Summarize in one sentence: \"The town council met on Tuesday to discuss the future of the old railway "
    "station. Some members want to turn it into a museum about the region's industrial past, while others "
    "prefer to sell the land to a developer who has promised to build affordable flats. After two hours of "
    "debate, the council agreed to run a public survey before deciding next spring.\"",
    "Summarize this for a ten-year-old: \"Honeybees tell each other where flowers are with a movement called "
    "the waggle dance. A forager back at the hive walks in a figure-eight, and the angle of the straight part "
    "of the dance tells the other bees which direction to fly relative to the sun. The longer the waggle, "
    "the farther away the flowers are.\"",
    "What is the main point of this text? \"Many people think creativity is a rare gift, but those who study "
    "creative work often find it depends more on habits than on talent. Writers and painters who produce a "
    "lot tend to work at the same hour every day, keep notes of half-formed ideas, and throw away most of "
    "what they make. Quantity, it seems, is the road to quality.\"",
    "Summarize this email in two bullet points: \"Hi team, a reminder that the office will be closed on "
    "Friday while the heating system is repaired. Please take your laptops home on Thursday evening if you "
    "plan to work remotely. Also, the quarterly report deadline has moved from the 15th to the 20th, so you "
    "have a few extra days. Thanks, Dana\"",
    "Summarize this and explain why it matters: \"In 1854 a cholera outbreak struck a London neighborhood. "
    "A doctor marked every case on a map and saw that they clustered around one public water pump. When the "
    "pump's handle was removed, new cases fell sharply. The episode became a famous early example of using "
    "data to find the source of a disease.\"",
    "Summarize this product review: \"I bought this blender to make smoothies every morning. It is powerful "
    "and crushes ice easily, but it is extremely loud and the lid leaks if you fill it more than halfway. "
    "Cleaning is easy because the blade comes out. Decent for the price, but I wish I had picked a quieter "
    "model.\"",
    "Summarize: \"The expedition set out in early June with twelve members and supplies for six weeks. Heavy "
    "rain washed away part of the trail in the second week, forcing the group onto a longer route through "
    "the forest. Two members turned back with minor injuries. The other ten reached the summit on the "
    "thirty-first day, later than planned, and everyone came home safely.\"",
    "Summarize in one sentence: \"Sourdough bread rises thanks to a culture of wild yeast and bacteria "
    "rather than commercial yeast. The bacteria make acids that give the bread its tangy taste and help it "
    "keep longer. Because the culture works slowly, the dough often needs a long rise, sometimes overnight.\"",
    "Summarize the argument: \"Some economists argue that raising the minimum wage costs jobs, because "
    "businesses hire fewer people when labor becomes more expensive. Others point to studies where moderate "
    "increases had little effect on employment and improved the lives of low-income families. The debate "
    "often comes down to how large the increase is and how fast it is introduced.\"",
    "TL;DR please: \"Starting next month, our library will run a pilot that lets members borrow tools as "
    "well as books. The collection will include drills, ladders, sewing machines and garden equipment. "
    "Members over 18 may borrow up to two tools at a time for one week. If the pilot goes well, every "
    "branch will offer it.\"",
    "Summarize these meeting notes: \"Decided: launch moves to May 3. Open question: who owns the "
    "onboarding emails? Risk: the payment provider has not confirmed the new API limits. Next steps: Priya "
    "drafts the announcement; Marco checks with the payment provider by Wednesday.\"",
    "Summarize: \"Octopuses have three hearts and blue blood. Two of the hearts pump blood through the gills "
    "and the third pumps it around the rest of the body. Their blood carries oxygen with a copper-based "
    "molecule, which works better than iron-based hemoglobin in cold water that holds little oxygen.\"",
    "Summarize for a busy manager: \"The customer survey got 1,240 responses. Satisfaction with delivery "
    "speed rose from 71% to 80% since last year, but satisfaction with customer support fell from 76% to "
    "68%. Most complaints mention long waits on the phone. Customers who used live chat were much happier "
    "than those who called.\"",
    "Summarize this story and say what its lesson is: \"An old man planted a walnut tree in his garden, "
    "knowing he would never live to eat its nuts. When his neighbors laughed at him, he said he had enjoyed "
    "the fruit of trees planted by people he never met, and now he wanted to do the same for someone else.\"",
    "Summarize: \"The first bicycles, built early in the nineteenth century, had no pedals: riders pushed "
    "themselves along with their feet. Pedals on the front wheel came later and led to designs with huge "
    "front wheels for more speed. The safety bicycle, with two wheels of the same size and a chain driving "
    "the rear one, made cycling popular with ordinary people by the 1890s.\"",
    "Give me the key facts from this notice in a short list: \"Water will be shut off on Elm Street on "
    "Monday from 9 am to 3 pm while a main pipe is replaced. Residents should store some drinking water "
    "beforehand. Parking on the east side of the street will not be allowed during the work.\"",
])

EXPLAIN = _cat("explain", [
    "Explain how a refrigerator keeps food cold.",
    "Explain supply and demand with an everyday example.",
    "Explain recursion to someone who has never programmed.",
    "Explain electric current using a water analogy.",
    "Explain why the ocean is salty.",
    "Explain how a credit score works.",
    "Explain the greenhouse effect in simple terms.",
    "Explain what machine learning is to a twelve-year-old.",
    "Explain how the heart pumps blood around the body.",
    "Explain how airplanes stay in the air.",
    "Explain the difference between a simile and a metaphor, with examples.",
    "Explain compound interest and why it matters for savings.",
    "Explain how a GPS receiver works out where you are.",
    "Explain the main scientific theories about why we dream.",
    "Explain the rules of chess in a short paragraph.",
    "Explain how a web page gets from a server to my screen.",
    "Explain how vaccination and herd immunity are related.",
    "Explain why ice floats on water.",
    "Explain what an API is using a restaurant analogy.",
    "Explain the water cycle step by step.",
])

REWRITE = _cat("rewrite", [
    "Rewrite this to sound more formal: \"Hey, can you send me that report thing by tomorrow?\"",
    "Fix the grammar: \"Me and him goes to the store yesterday and buyed three apple.\"",
    "Make this shorter without losing meaning: \"Due to the fact that it was raining very heavily outside, "
    "we made the decision to stay inside the house for the whole of the afternoon.\"",
    "Rewrite this in a friendlier tone: \"Your request has been denied. Submit the form again with all "
    "fields completed.\"",
    "Turn this list into one sentence: eggs, flour, sugar, butter, a pinch of salt.",
    "Paraphrase the saying \"The early bird catches the worm\" and explain what it means.",
    "Rewrite in the passive voice: \"The committee approved the new budget.\"",
    "Turn this casual text into professional language: \"gonna be late, traffic is nuts, start w/o me\"",
    "Correct the spelling: \"I recieved the pakage on wensday and it was definately damaged.\"",
    "Make this product description more exciting: \"This is a backpack. It has two pockets and it is blue.\"",
    "Rewrite this sentence for a children's book: \"The nocturnal mammal emerged from its burrow to forage.\"",
    "Give me three different ways to say \"thank you for your help\" in an email.",
    "Put this in plain English: \"The lessee shall be responsible for maintaining the premises in a clean "
    "and sanitary condition.\"",
    "Rewrite this headline so it is less sensational: \"SHOCKING: Local Man Finds Unbelievable Secret in "
    "His Own Backyard!\"",
    "Turn this into a bulleted list: \"To apply, fill in the form, attach a copy of your ID, pay the fee, "
    "and send everything to the address below.\"",
])

BRAINSTORM = _cat("brainstorm", [
    "Give me ten name ideas for a small neighborhood bakery.",
    "List five fun things to do with kids on a rainy Saturday.",
    "Suggest some topics for a school science fair project.",
    "What are some inexpensive date ideas?",
    "Brainstorm birthday gifts for someone who loves gardening.",
    "List some questions I could ask to get to know a new colleague.",
    "Give me ideas for a healthy lunch I can make in ten minutes.",
    "Suggest names for a grey kitten.",
    "What could I write about in a short blog on personal finance?",
    "List some hobbies that don't cost much money.",
    "Suggest a weekly workout plan for a beginner with no equipment.",
    "Brainstorm slogans for a campaign that encourages people to recycle.",
    "List some icebreaker games for a team meeting.",
    "Give me ideas for a short story set in the year 2300.",
    "Suggest a three-course vegetarian dinner menu.",
])

CHAT = _cat("chat", [
    "Hi! How is your day going?",
    "Tell me a joke about vegetables.",
    "What is your favorite season, and why?",
    "I just finished my first marathon!",
    "Can you recommend a movie for a cozy night in?",
    "Tell me a fun fact about octopuses.",
    "Good morning! Give me something encouraging to start the day.",
    "I'm bored. Can you give me a riddle?",
    "What should I name my new houseplant?",
    "What is the strangest animal you know of?",
])

# Other languages: each tuple carries its ISO 639-1 code.
FRENCH = [
    Prompt("factual", "Quelle est la différence entre un lac et un étang ?", "fr"),
    Prompt("howto", "Comment préparer une pâte à crêpes sans grumeaux ?", "fr"),
    Prompt("story", "Écris une courte histoire sur un chat qui prend le train pour voir la mer.", "fr"),
    Prompt("poem", "Écris un petit poème sur la pluie d'automne à Paris.", "fr"),
    Prompt("advice", "J'ai du mal à me lever le matin. Tu as des conseils ?", "fr"),
    Prompt("explain", "Explique-moi simplement comment se forme un arc-en-ciel.", "fr"),
    Prompt("math", "Un livre coûte 12 euros. Combien coûtent 7 livres avec une réduction de 10 % ?", "fr"),
    Prompt("opinion", "Faut-il interdire les voitures dans le centre des villes ? Donne des arguments pour et contre.", "fr"),
    Prompt("code_python", "Écris une fonction Python qui compte les voyelles dans une phrase.", "fr"),
    Prompt("roleplay", "Fais comme si tu étais un boulanger parisien et présente-moi tes meilleurs pains.", "fr"),
    Prompt("brainstorm", "Donne-moi cinq idées de sorties pour un dimanche en famille.", "fr"),
]

SPANISH = [
    Prompt("factual", "¿Por qué los gatos casi siempre caen de pie?", "es"),
    Prompt("howto", "¿Cómo puedo preparar una tortilla de patatas?", "es"),
    Prompt("story", "Escribe un cuento corto sobre un niño que encuentra una estrella en la playa.", "es"),
    Prompt("poem", "Escribe un poema breve sobre el mar y la nostalgia.", "es"),
    Prompt("advice", "Mañana tengo una entrevista de trabajo y estoy nervioso. ¿Qué me recomiendas?", "es"),
    Prompt("explain", "Explica qué es la fotosíntesis de forma sencilla.", "es"),
    Prompt("math", "Si un coche recorre 240 kilómetros en 3 horas, ¿cuál es su velocidad media?", "es"),
    Prompt("opinion", "¿Es mejor vivir en la ciudad o en el campo? Da tu opinión.", "es"),
    Prompt("code_sql", "Escribe una consulta SQL que muestre los productos con un precio mayor que 50.", "es"),
    Prompt("summary", "Resume en una frase: \"El mercado del pueblo abre todos los sábados. Los agricultores "
           "venden frutas, verduras y quesos de la región, y muchas familias aprovechan para desayunar en "
           "los puestos de comida.\"", "es"),
]

GERMAN = [
    Prompt("factual", "Warum ist der Himmel blau?", "de"),
    Prompt("howto", "Wie backe ich einen einfachen Apfelkuchen?", "de"),
    Prompt("story", "Schreib eine kurze Geschichte über einen Igel, der im Winter nicht schlafen kann.", "de"),
    Prompt("poem", "Schreib ein kurzes Gedicht über den Herbstwald.", "de"),
    Prompt("advice", "Wie kann ich meine Zeit beim Lernen besser einteilen?", "de"),
    Prompt("explain", "Erkläre, wie ein Elektroauto funktioniert.", "de"),
    Prompt("math", "Ein Zug fährt 120 km/h. Wie weit kommt er in 2,5 Stunden?", "de"),
    Prompt("opinion", "Sollten Kinder schon in der Grundschule programmieren lernen?", "de"),
]

CHINESE = [
    Prompt("factual", "长城有多长？它是什么时候修建的？", "zh"),
    Prompt("howto", "怎样才能养好一盆绿萝？", "zh"),
    Prompt("story", "写一个关于小兔子第一次看见雪的短故事。", "zh"),
    Prompt("poem", "写一首关于月亮的短诗。", "zh"),
    Prompt("advice", "我经常熬夜，怎样才能早点睡觉？", "zh"),
    Prompt("explain", "请用简单的语言解释什么是人工智能。", "zh"),
    Prompt("math", "小明有15个苹果，送给朋友6个，又买了8个，现在他有几个苹果？", "zh"),
    Prompt("code_python", "用Python写一个函数，计算列表中所有数字的和。", "zh"),
]

OTHER_LANGUAGES = [
    Prompt("howto", "Come si prepara un buon risotto ai funghi?", "it"),
    Prompt("poem", "Scrivi una breve poesia sul tramonto d'estate.", "it"),
    Prompt("opinion", "Quali sono i vantaggi di imparare una seconda lingua?", "it"),
    Prompt("factual", "Qual é o maior rio do Brasil e por que ele é importante?", "pt"),
    Prompt("story", "Escreva uma pequena história sobre um pescador e uma gaivota.", "pt"),
    Prompt("advice", "Como posso economizar dinheiro todo mês?", "pt"),
    Prompt("factual", "富士山について簡単に教えてください。", "ja"),
    Prompt("poem", "猫についての俳句を書いてください。", "ja"),
    Prompt("howto", "朝ごはんに簡単に作れる料理を教えてください。", "ja"),
    Prompt("explain", "Почему зимой холодно?", "ru"),
    Prompt("poem", "Напиши короткое стихотворение о весне.", "ru"),
    Prompt("howto", "Hoe zet ik een goede kop thee?", "nl"),
    Prompt("story", "Schrijf een kort verhaal over een fiets die kan praten.", "nl"),
    Prompt("brainstorm", "비 오는 날에 할 수 있는 재미있는 활동을 추천해 주세요.", "ko"),
    Prompt("explain", "ما هي فوائد شرب الماء بانتظام؟", "ar"),
    Prompt("factual", "भारत की राजधानी क्या है और वहाँ क्या देखने लायक है?", "hi"),
    Prompt("howto", "Jak nauczyć się pływać jako dorosły?", "pl"),
    Prompt("advice", "Sabahları daha enerjik olmak için ne yapabilirim?", "tr"),
]

PROMPTS: list[Prompt] = (FACTUAL + HOWTO + STORY + POEM + CODE_PYTHON + CODE_JS + CODE_SQL + CODE_SHELL
                         + ADVICE + MATH + OPINION + ROLEPLAY + SUMMARY + EXPLAIN + REWRITE + BRAINSTORM + CHAT
                         + FRENCH + SPANISH + GERMAN + CHINESE + OTHER_LANGUAGES)


class Conversation(NamedTuple):
    category: str
    messages: tuple[dict[str, str], ...]  # alternating user/assistant, ending with a user turn
    lang: str = "en"


def _conv(*turns: str, lang: str = "en") -> Conversation:
    roles = ("user", "assistant")
    return Conversation("multi_turn", tuple({"role": roles[i % 2], "content": t} for i, t in enumerate(turns)),
                        lang)


MULTI_TURN: list[Conversation] = [
    _conv("Can you recommend a good book for a long flight?",
          "Happy to. Do you prefer fiction or nonfiction, and do you want something light or something you "
          "can get lost in?",
          "Fiction, something absorbing but not too dark."),
    _conv("I want to start learning Python.",
          "Great choice. Have you programmed before, and what would you like to build?",
          "No experience at all. I'd like to automate boring spreadsheet tasks at work."),
    _conv("What's a quick dinner I can make tonight?",
          "How about a vegetable stir-fry with rice? It takes about twenty minutes. Which vegetables do you "
          "have at home?",
          "Carrots, an onion and some frozen peas. No soy sauce, though."),
    _conv("Write a two-line poem about coffee.",
          "Dark and warm, the morning's art,\na bitter cup that starts my heart.",
          "Nice! Now do the same for tea."),
    _conv("What is 12 times 15?", "12 times 15 is 180.", "And if I divide that by 4?"),
    _conv("I'm planning a trip to Japan in the spring.",
          "Spring is a lovely time to go, especially for the cherry blossoms. How long will you stay, and "
          "which cities are you considering?",
          "Ten days, probably Tokyo and Kyoto. What shouldn't I miss?"),
    _conv("The bottom leaves of my tomato plants are turning yellow.",
          "That is common. It can come from overwatering, a lack of nitrogen, or simply old leaves dying "
          "off. How often do you water them?",
          "Every day, quite a lot, because it has been hot."),
    _conv("Explain what a variable is in programming.",
          "A variable is a named box that holds a value, such as a number or some text, so your program "
          "can use it and change it later.",
          "Can you show me an example in JavaScript?"),
    _conv("Tell me a short story about a dragon.",
          "Once upon a time, a small green dragon named Pip lived on a hill above a sleepy village. Unlike "
          "other dragons, Pip could not breathe fire, only warm puffs of steam.",
          "Keep going. What happens when winter comes?"),
    _conv("Je voudrais apprendre l'espagnol.",
          "Très bonne idée ! Combien de temps peux-tu y consacrer chaque semaine ?",
          "Environ trente minutes par jour. Par quoi je commence ?", lang="fr"),
    _conv("Will it be hard for me to run 10 km?",
          "It depends on your current fitness. Do you run at the moment, and if so, how far?",
          "I can run about 3 km without stopping."),
    _conv("Help me write a message to my landlord.",
          "Of course. What is the message about?",
          "The heating in my flat hasn't worked for three days."),
]

CATEGORIES = sorted({p.category for p in PROMPTS})
